//! moerunner: a fused Mixture-of-Experts layer runtime.
//!
//! Dependencies run one way: core types (`error`, `config`, `tensor`, `rng`, `weights`) ← number
//! formats, routing, activations ← layer validation and the forward-call checks ← the float64
//! `reference`, the loaders, `shard`, `synth`, the `dense` linear layer ← `backend`s ← `runner` ← `random_cases`, `bench`,
//! `parallel`.
//! See ARCHITECTURE.md; `tests/tidy/` checks it.

pub mod activation;
pub mod backend;
pub mod bench;
pub mod checkpoint;
pub mod clock;
pub mod config;
pub mod dense;
pub mod error;
pub mod formats;
pub mod forward;
pub mod layer_file;
pub mod parallel;
pub mod presets;
pub mod random_cases;
pub mod reference;
pub mod rng;
pub mod routing;
pub mod runner;
pub mod shard;
pub mod size;
pub mod synth;
pub mod tensor;
pub mod validate;
pub mod weights;

pub use config::{
    Activation, ActivationFormat, LayerConfig, Parallelism, RoutingConfig, RoutingMethod, W13Order,
    WeightFormat,
};
pub use error::{MoeError, Result};
pub use forward::{ForwardInput, ForwardOutput};
pub use routing::{Routes, RoutingInput};
pub use runner::{BackendChoice, Runner};
pub use tensor::{DType, HostTensor};
pub use weights::{BlockScales, LayerWeights, MoeLayer, QuantizedTensor};
