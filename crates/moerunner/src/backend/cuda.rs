//! The CUDA backend (issue 3). Without the `cuda` feature it is a stub whose constructor explains
//! why it is unavailable, so the runner and CLI need no `cfg` of their own.

use super::Backend;
use crate::error::{MoeError, Result};

/// Returns the CUDA backend, or the reason it cannot be used on this build or machine.
pub fn create() -> Result<Box<dyn Backend>> {
    Err(MoeError::Cuda(
        "this build has no CUDA backend (the `cuda` feature is off)".into(),
    ))
}
