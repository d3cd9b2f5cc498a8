//! `MoeError` → Python: one exception class, `moerunner.MoeError` (a `ValueError`), whose message
//! is the library's (it names the tensor, key, file or token).

use pyo3::create_exception;
use pyo3::exceptions::PyValueError;
use pyo3::PyErr;

create_exception!(
    moerunner,
    MoeError,
    PyValueError,
    "An error of the moerunner library: a bad layer, checkpoint or input, or a device failure. \
     The message names the tensor, key, file or token."
);

pub fn to_py(e: moerunner::MoeError) -> PyErr {
    MoeError::new_err(e.to_string())
}
