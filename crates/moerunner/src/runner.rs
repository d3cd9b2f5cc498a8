//! The one entry point: a registry of backends, automatic choice, and a clear error listing every
//! backend's reason when none fits. The runner never names a concrete backend type beyond the
//! registry's constructor list.

use std::sync::Arc;

use crate::backend::{self, Backend, LoadedLayer};
use crate::error::{MoeError, Result};
use crate::forward::{ForwardInput, ForwardOutput};
use crate::weights::MoeLayer;

/// Which backend to use.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum BackendChoice {
    /// The first registered, auto-eligible backend that supports the layer (CUDA before CPU).
    Auto,
    /// A backend by name (`cpu`, `cuda`, `reference`).
    Named(String),
}

/// The names of the registry's backends, in its order (`Runner::new` registers exactly these).
pub const BACKEND_NAMES: &[&str] = &["cuda", "cpu", "reference"];

impl std::str::FromStr for BackendChoice {
    type Err = MoeError;
    fn from_str(s: &str) -> Result<Self> {
        if s == "auto" {
            Ok(BackendChoice::Auto)
        } else if BACKEND_NAMES.contains(&s) {
            Ok(BackendChoice::Named(s.to_string()))
        } else {
            Err(MoeError::invalid(
                "--backend",
                format!(
                    "unknown backend `{s}`; known: auto, {}",
                    BACKEND_NAMES.join(", ")
                ),
            ))
        }
    }
}

impl std::fmt::Display for BackendChoice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            BackendChoice::Auto => f.write_str("auto"),
            BackendChoice::Named(n) => f.write_str(n),
        }
    }
}

/// A registered backend, or why it could not be created on this machine/build.
pub enum Registered {
    Ready(Box<dyn Backend>),
    Unavailable { name: &'static str, reason: String },
}

impl Registered {
    pub fn name(&self) -> &'static str {
        match self {
            Registered::Ready(b) => b.name(),
            Registered::Unavailable { name, .. } => name,
        }
    }
}

pub struct Runner {
    backends: Vec<Registered>,
}

impl Runner {
    /// Every backend this build knows, in order of preference.
    pub fn new() -> Self {
        Self::with_cuda(backend::cuda::create())
    }

    /// [`Runner::new`] with the CUDA backend on GPU `ordinal` (one rank per GPU).
    pub fn on_gpu(ordinal: usize) -> Self {
        Self::with_cuda(backend::cuda::create_on(ordinal))
    }

    fn with_cuda(cuda: Result<Box<dyn backend::Backend>>) -> Self {
        let cuda = match cuda {
            Ok(b) => Registered::Ready(b),
            Err(e) => Registered::Unavailable {
                name: "cuda",
                reason: match e {
                    MoeError::Cuda(why) => why,
                    other => other.to_string(),
                },
            },
        };
        Runner {
            backends: vec![
                cuda,
                Registered::Ready(Box::new(backend::cpu::CpuBackend)),
                Registered::Ready(Box::new(backend::reference::ReferenceBackend)),
            ],
        }
    }

    pub fn backends(&self) -> &[Registered] {
        &self.backends
    }

    /// The backend `choice` picks for `config`, or every considered backend's reason for refusing
    /// it (empty when `choice` names no known backend). The one selection rule of `load` and
    /// `supports`.
    fn choose(
        &self,
        choice: &BackendChoice,
        config: &crate::config::LayerConfig,
    ) -> std::result::Result<&dyn Backend, Vec<(String, String)>> {
        let mut reasons = Vec::new();
        for reg in &self.backends {
            let wanted = match choice {
                BackendChoice::Auto => true,
                BackendChoice::Named(n) => n == reg.name(),
            };
            if !wanted {
                continue;
            }
            match reg {
                Registered::Unavailable { name, reason } => {
                    reasons.push((name.to_string(), reason.clone()))
                }
                Registered::Ready(b) => {
                    if *choice == BackendChoice::Auto && !b.auto_eligible() {
                        reasons.push((
                            b.name().to_string(),
                            "not chosen automatically (ask for it by name)".into(),
                        ));
                        continue;
                    }
                    match b.supports(config) {
                        Ok(()) => return Ok(&**b),
                        Err(why) => reasons.push((b.name().to_string(), why)),
                    }
                }
            }
        }
        Err(reasons)
    }

    /// Why the backend `choice` names cannot run anything on this machine or build (CUDA without
    /// a GPU, a driver or NVRTC; a build without the feature), or Ok when it can (or is `auto`).
    pub fn available(&self, choice: &BackendChoice) -> Result<()> {
        let BackendChoice::Named(n) = choice else {
            return Ok(());
        };
        match self.backends.iter().find(|r| r.name() == n) {
            Some(Registered::Ready(_)) => Ok(()),
            Some(Registered::Unavailable { name, reason }) => Err(MoeError::Unsupported(format!(
                "backend {name} is not available here: {reason}"
            ))),
            None => Err(MoeError::invalid(
                "backend",
                format!(
                    "unknown backend `{n}`; known: auto, {}",
                    BACKEND_NAMES.join(", ")
                ),
            )),
        }
    }

    /// The name of the backend `choice` would load `config` on, or why none can.
    pub fn chosen_name(
        &self,
        choice: &BackendChoice,
        config: &crate::config::LayerConfig,
    ) -> Result<&'static str> {
        match self.choose(choice, config) {
            Ok(b) => Ok(b.name()),
            Err(reasons) => Err(MoeError::NoBackend { reasons }),
        }
    }

    /// Whether `choice` can run `config` here, or why not.
    pub fn supports(
        &self,
        choice: &BackendChoice,
        config: &crate::config::LayerConfig,
    ) -> std::result::Result<(), String> {
        match self.choose(choice, config) {
            Ok(_) => Ok(()),
            Err(reasons) if reasons.is_empty() => Err(format!("unknown backend `{choice}`")),
            Err(reasons) => Err(reasons
                .iter()
                .map(|(name, why)| format!("{name}: {why}"))
                .collect::<Vec<_>>()
                .join("; ")),
        }
    }

    /// Loads `layer` on the chosen backend.
    pub fn load(&self, layer: MoeLayer, choice: &BackendChoice) -> Result<Box<dyn LoadedLayer>> {
        match self.choose(choice, layer.config()) {
            Ok(backend) => Ok(Box::new(Checked(backend.load(Arc::new(layer))?))),
            Err(reasons) if reasons.is_empty() => {
                let names: Vec<&str> = self.backends.iter().map(|r| r.name()).collect();
                Err(MoeError::invalid(
                    "backend",
                    format!(
                        "unknown backend `{choice}`; known: auto, {}",
                        names.join(", ")
                    ),
                ))
            }
            Err(reasons) => Err(MoeError::NoBackend { reasons }),
        }
    }
}

/// Every layer the runner hands out keeps the run-time overflow rule whatever its backend: an
/// output that is not finite is an error naming the token ([`crate::forward::check_output`]).
struct Checked(Box<dyn LoadedLayer>);

impl LoadedLayer for Checked {
    fn backend(&self) -> &'static str {
        self.0.backend()
    }
    fn layer(&self) -> &MoeLayer {
        self.0.layer()
    }
    fn forward(&self, input: &ForwardInput<'_>) -> Result<ForwardOutput> {
        let out = self.0.forward(input)?;
        crate::forward::check_output(&out)?;
        Ok(out)
    }
    fn time_device_forward(&self, input: &ForwardInput<'_>, iters: usize) -> Option<Result<f64>> {
        self.0.time_device_forward(input, iters)
    }
    fn time_device_stages(
        &self,
        input: &ForwardInput<'_>,
        iters: usize,
    ) -> Option<Result<Vec<crate::backend::StageTime>>> {
        self.0.time_device_stages(input, iters)
    }
    fn preparation(&self) -> Option<String> {
        self.0.preparation()
    }
    fn kernel_path(&self) -> Option<&'static str> {
        self.0.kernel_path()
    }
    fn tactic(&self, tokens: usize) -> Option<String> {
        self.0.tactic(tokens)
    }
    fn workspace_bytes(&self, tokens: usize) -> Option<usize> {
        self.0.workspace_bytes(tokens)
    }
    #[cfg(feature = "cuda")]
    fn as_cuda(&self) -> Option<&crate::backend::cuda::layer::CudaLayer> {
        self.0.as_cuda()
    }
}

impl Default for Runner {
    fn default() -> Self {
        Self::new()
    }
}

/// Convenience: load on `choice` and run one forward call.
pub fn run_once(
    layer: MoeLayer,
    choice: &BackendChoice,
    input: &ForwardInput<'_>,
) -> Result<ForwardOutput> {
    Runner::new().load(layer, choice)?.forward(input)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A loaded layer whose optional answers are all present.
    struct Answers(MoeLayer);
    impl LoadedLayer for Answers {
        fn backend(&self) -> &'static str {
            "answers"
        }
        fn layer(&self) -> &MoeLayer {
            &self.0
        }
        fn forward(&self, _: &ForwardInput<'_>) -> Result<ForwardOutput> {
            Err(MoeError::invalid("forward", "not called here"))
        }
        fn time_device_forward(&self, _: &ForwardInput<'_>, _: usize) -> Option<Result<f64>> {
            Some(Ok(1.5))
        }
        fn preparation(&self) -> Option<String> {
            Some("padded".into())
        }
        fn kernel_path(&self) -> Option<&'static str> {
            Some("path")
        }
        fn tactic(&self, tokens: usize) -> Option<String> {
            Some(format!("tactic {tokens}"))
        }
    }

    /// The runner's overflow-checking wrapper passes on every optional answer of the layer it
    /// wraps (a method it did not forward would read as the trait's `None` default).
    #[test]
    fn the_checked_wrapper_forwards_every_optional_answer() {
        use crate::config::*;
        let cfg = LayerConfig {
            num_experts: 2,
            hidden: 32,
            intermediate: 32,
            weight_format: WeightFormat::Bf16,
            activation_format: ActivationFormat::Bf16,
            activation: Activation::Swiglu,
            w13_order: W13Order::GateUp,
            routing: RoutingConfig::new(RoutingMethod::Renormalize, 1),
            local_experts: 0..2,
            parallelism: Parallelism::default(),
        };
        let layer = crate::synth::random_layer(&cfg, 1, false).expect("layer");
        let checked = Checked(Box::new(Answers(layer)));
        assert_eq!(checked.preparation().as_deref(), Some("padded"));
        assert_eq!(checked.kernel_path(), Some("path"));
        assert_eq!(checked.tactic(7).as_deref(), Some("tactic 7"));
        assert_eq!(checked.backend(), "answers");
    }
}
