//! `quantize_weights`: stacked expert weights `[E, rows, cols]` (f32, bf16 or f16 on the CPU)
//! into a weight format, returned as the layer file's tensors of one projection (the library's
//! bit-exact quantizer; `projection_tensors` names and shapes them).

use moerunner::{HostTensor, WeightFormat};
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::PyBytes;

use crate::errors::to_py;
use crate::tensors::{arg_error, import};

/// One tensor handed back: (name, layer-file dtype, shape, little-endian bytes).
type Out<'py> = (String, &'static str, Vec<usize>, Bound<'py, PyBytes>);

#[pyfunction]
#[pyo3(signature = (weights, weight_format, *, name="w13", global_scales=None))]
pub fn quantize_weights<'py>(
    py: Python<'py>,
    weights: &Bound<'py, PyAny>,
    weight_format: &str,
    name: &str,
    global_scales: Option<&Bound<'py, PyAny>>,
) -> PyResult<Vec<Out<'py>>> {
    let format: WeightFormat = weight_format
        .parse()
        .map_err(|e| PyValueError::new_err(format!("weight_format: {e}")))?;
    let view = import(weights, "weights", None)?;
    let [e, rows, cols] = view.shape[..] else {
        return Err(arg_error(
            "weights",
            format!("shape {:?}, expected [E, rows, cols]", view.shape),
        ));
    };
    let values = HostTensor::new(
        "weights",
        view.dtype,
        view.shape.clone(),
        view.host_bytes()?.to_vec().into(),
    )
    .map_err(to_py)?
    .to_f32_vec("weights")
    .map_err(to_py)?;
    let globals = match global_scales {
        Some(g) if !g.is_none() => {
            let g = import(g, "global_scales", None)?;
            let t = HostTensor::new(
                "global_scales",
                g.dtype,
                g.shape.clone(),
                g.host_bytes()?.to_vec().into(),
            )
            .map_err(to_py)?;
            Some(t.to_f32_vec("global_scales").map_err(to_py)?)
        }
        _ => None,
    };
    let q = py
        .detach(|| {
            moerunner::formats::quantize_weights(format, e, rows, cols, &values, globals.as_deref())
        })
        .map_err(to_py)?;
    let mut tensors = Vec::new();
    moerunner::layer_file::projection_tensors(name, &q, &mut tensors);
    Ok(tensors
        .into_iter()
        .map(|(n, t)| (n, t.dtype.name(), t.shape, PyBytes::new(py, &t.bytes)))
        .collect())
}
