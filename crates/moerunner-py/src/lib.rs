//! The native half of the `moerunner` Python package (`moerunner._native`): layers loaded from
//! layer files and checkpoints, called on numpy / torch tensors through DLPack. The pure-Python
//! half (`python/moerunner/__init__.py`) allocates outputs, finds torch's stream and holds the
//! docstrings users read.
//!
//! No panic crosses into Python as a crash: PyO3 turns a panic into `PanicException`, and every
//! user error is an exception naming the argument.

mod errors;
mod layer;
mod quantize;
mod tensors;

use pyo3::prelude::*;
use pyo3::types::{PyDict, PyList};

/// What this build and machine can do: the package version and each backend with its devices
/// and supported formats, or why it is unavailable.
#[pyfunction]
fn info(py: Python<'_>) -> PyResult<Bound<'_, PyDict>> {
    let runner = moerunner::Runner::new();
    let backends = PyList::empty(py);
    for reg in runner.backends() {
        let d = PyDict::new(py);
        d.set_item("name", reg.name())?;
        match reg {
            moerunner::runner::Registered::Ready(b) => {
                let i = b.info();
                d.set_item("available", true)?;
                d.set_item("devices", i.devices)?;
                d.set_item("supports", i.supports)?;
            }
            moerunner::runner::Registered::Unavailable { reason, .. } => {
                d.set_item("available", false)?;
                d.set_item("reason", reason)?;
            }
        }
        backends.append(d)?;
    }
    let out = PyDict::new(py);
    out.set_item("version", env!("CARGO_PKG_VERSION"))?;
    out.set_item("cuda_feature", cfg!(feature = "cuda"))?;
    out.set_item("backends", backends)?;
    Ok(out)
}

#[pymodule]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<layer::NativeLayer>()?;
    m.add_function(wrap_pyfunction!(info, m)?)?;
    m.add_function(wrap_pyfunction!(quantize::quantize_weights, m)?)?;
    m.add("MoeError", m.py().get_type::<errors::MoeError>())?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    Ok(())
}
