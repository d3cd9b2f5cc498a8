//! The library's one error type, grouped by concern. Every boundary check returns one of these;
//! library code never panics on bad input. The binary wraps it in `anyhow` and prints the chain.

use thiserror::Error;

pub type Result<T, E = MoeError> = std::result::Result<T, E>;

#[derive(Debug, Error)]
#[non_exhaustive]
pub enum MoeError {
    /// A tensor has the wrong shape. `name` is the tensor (or key) as the user knows it.
    #[error("tensor `{name}`: expected shape {expected}, got {got:?}")]
    Shape {
        name: String,
        expected: String,
        got: Vec<usize>,
    },

    /// A tensor has the wrong element type.
    #[error("tensor `{name}`: expected dtype {expected}, got {got}")]
    DType {
        name: String,
        expected: String,
        got: String,
    },

    /// A value is out of its legal range or malformed (NaN scale, id out of range, bad key value...).
    #[error("{what}: {why}")]
    Invalid { what: String, why: String },

    /// A required tensor or key is absent.
    #[error("missing {what}")]
    Missing { what: String },

    /// A configuration no backend (or not this backend) can run.
    #[error("unsupported: {0}")]
    Unsupported(String),

    /// The runner found no backend able to run a layer; every backend's reason is listed.
    #[error("no backend can run this layer:\n{}", .reasons.iter().map(|(b, r)| format!("  - {b}: {r}")).collect::<Vec<_>>().join("\n"))]
    NoBackend { reasons: Vec<(String, String)> },

    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },

    /// A safetensors container is malformed (truncated, bad header...).
    #[error("{path}: not a valid safetensors file: {why}")]
    Format { path: String, why: String },

    /// A JSON file (a checkpoint's `config.json` or index) is not valid JSON.
    #[error("{path}: not valid JSON: {why}")]
    Json { path: String, why: String },

    /// A request for memory above the budget (`size::check`), refused before allocating.
    #[error("{what} needs {bytes}, over the memory budget of {budget}; asked for by {asked_by} (raise the budget with --memory-budget or MOERUNNER_MEMORY_BUDGET if the machine has the memory)")]
    TooLarge {
        what: String,
        asked_by: String,
        bytes: String,
        budget: String,
    },

    /// A forward call's output holds a value that is not finite: the hidden states and scales are
    /// finite (checked), so the layer's products overflowed f32 or the output dtype for this
    /// token, or a weight element itself is inf/NaN (element bytes are not scanned at load).
    /// Named by token and column, never returned as data.
    #[error("tensor `output`: token {token} (column {column}) is {value}, not finite in {dtype}: the layer's products overflow for this token's hidden states, or a weight element it meets is inf or NaN (docs/robustness.md)")]
    Overflow {
        token: usize,
        column: usize,
        value: String,
        dtype: String,
    },

    /// Errors of the CUDA backend (driver, NVRTC, launches).
    #[error("cuda: {0}")]
    Cuda(String),

    /// A rank of a parallel run failed with its own error (`parallel`).
    #[error("rank {rank}: {error}")]
    Rank { rank: usize, error: Box<MoeError> },

    /// Communication between ranks failed: a peer failed (named in `why`), a collective timed
    /// out, or the ranks called different collectives (`parallel::comm`).
    #[error("rank {rank}: {why}")]
    Comm { rank: usize, why: String },
}

impl MoeError {
    pub fn invalid(what: impl Into<String>, why: impl Into<String>) -> Self {
        MoeError::Invalid {
            what: what.into(),
            why: why.into(),
        }
    }
    pub fn shape(name: impl Into<String>, expected: impl Into<String>, got: &[usize]) -> Self {
        MoeError::Shape {
            name: name.into(),
            expected: expected.into(),
            got: got.to_vec(),
        }
    }
    pub fn dtype(
        name: impl Into<String>,
        expected: impl Into<String>,
        got: impl std::fmt::Display,
    ) -> Self {
        MoeError::DType {
            name: name.into(),
            expected: expected.into(),
            got: got.to_string(),
        }
    }
    pub fn missing(what: impl Into<String>) -> Self {
        MoeError::Missing { what: what.into() }
    }
}
