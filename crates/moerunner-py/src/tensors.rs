//! Python tensors (numpy arrays, torch tensors: anything with `__dlpack__`) seen through DLPack
//! as a dtype, a shape and an address — no copy. Every refusal is a Python exception that names
//! the argument.

use std::ffi::c_void;

use dlpark::ffi::{DLDataTypeCode, DLDevice, DLDeviceType};
use dlpark::python::{DlpackStream, ImportedDlpack, StreamArg};
use dlpark::DlpackFlags;
use moerunner::DType;
use pyo3::exceptions::{PyTypeError, PyValueError};
use pyo3::prelude::*;

/// Where a tensor's memory is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Place {
    Cpu,
    Cuda(i32),
}

impl std::fmt::Display for Place {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Place::Cpu => f.write_str("cpu"),
            Place::Cuda(i) => write!(f, "cuda:{i}"),
        }
    }
}

/// One argument imported through DLPack: its memory stays alive as long as the view.
pub struct View {
    pub name: &'static str,
    pub dtype: DType,
    pub shape: Vec<usize>,
    /// The address of the first element (data pointer + byte offset).
    pub addr: u64,
    pub place: Place,
    pub read_only: bool,
    _owner: ImportedDlpack,
}

impl View {
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
    pub fn nbytes(&self) -> usize {
        self.numel() * self.dtype.size()
    }
    /// The bytes of a CPU tensor.
    pub fn host_bytes(&self) -> PyResult<&[u8]> {
        if self.place != Place::Cpu {
            return Err(arg_error(
                self.name,
                format!("is on {}, not the CPU", self.place),
            ));
        }
        if self.nbytes() == 0 {
            return Ok(&[]);
        }
        // SAFETY: a validated DLPack CPU tensor, compact (checked at import), of `nbytes` bytes
        // from `addr`, kept alive by `_owner` for the life of `self`.
        Ok(unsafe { std::slice::from_raw_parts(self.addr as *const u8, self.nbytes()) })
    }
    /// Writes `bytes` into a CPU tensor (the caller checked dtype and shape).
    pub fn write_host(&mut self, bytes: &[u8]) -> PyResult<()> {
        if self.place != Place::Cpu {
            return Err(arg_error(
                self.name,
                format!("is on {}, not the CPU", self.place),
            ));
        }
        if self.read_only {
            return Err(arg_error(self.name, "is read-only".into()));
        }
        if bytes.len() != self.nbytes() {
            return Err(arg_error(
                self.name,
                format!("holds {} bytes, not {}", self.nbytes(), bytes.len()),
            ));
        }
        if bytes.is_empty() {
            return Ok(());
        }
        // SAFETY: as `host_bytes`, and the producer did not mark the tensor read-only.
        unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), self.addr as *mut u8, bytes.len()) };
        Ok(())
    }
    /// The byte range of the tensor's memory, for overlap checks.
    pub fn span(&self) -> std::ops::Range<u64> {
        self.addr..self.addr + self.nbytes() as u64
    }
}

/// A `ValueError` naming the argument.
pub fn arg_error(name: &str, why: String) -> PyErr {
    PyValueError::new_err(format!("{name}: {why}"))
}

/// The consumer stream of an import: the CUDA stream the call will run on. A producer on that
/// same stream needs no ordering; another stream is ordered by Python's `__dlpack__(stream=…)`.
pub struct CudaStream(pub *mut c_void);

// SAFETY: the handle is the caller's current stream of the tensor's device (torch's), live for the
// call; it is passed on as CUDA's DLPack stream convention (`dlpark::python::consumer::stream::cuda`).
unsafe impl DlpackStream for CudaStream {
    fn as_python_arg(&self, _py: Python<'_>, device: DLDevice) -> PyResult<StreamArg> {
        // A CPU tensor among CUDA arguments gets no stream (its producer would refuse one); the
        // call then refuses it by name for being on the wrong device.
        Ok(if device.device_type == DLDeviceType::CUDA {
            dlpark::python::consumer::stream::cuda(self.0)
        } else {
            dlpark::python::consumer::stream::none()
        })
    }
    unsafe fn wait_for_producer(&self, _device: DLDevice, producer: *mut c_void) -> PyResult<bool> {
        Ok(producer == self.0)
    }
}

fn dtype_of(name: &str, code: DLDataTypeCode, bits: u8, lanes: u16) -> PyResult<DType> {
    let dtype = match (code, bits, lanes) {
        (DLDataTypeCode::FLOAT, 32, 1) => Some(DType::F32),
        (DLDataTypeCode::FLOAT, 16, 1) => Some(DType::F16),
        (DLDataTypeCode::BFLOAT, 16, 1) => Some(DType::BF16),
        (DLDataTypeCode::INT, 32, 1) => Some(DType::I32),
        (DLDataTypeCode::UINT, 8, 1) => Some(DType::U8),
        (DLDataTypeCode::FLOAT8_E4M3FN, 8, 1) => Some(DType::F8E4M3),
        _ => None,
    };
    dtype.ok_or_else(|| {
        let what = match (code, bits) {
            (DLDataTypeCode::INT, 64) => {
                "int64 (pass int32: `.int()` / `.astype(np.int32)`)".into()
            }
            (DLDataTypeCode::FLOAT, 64) => "float64".into(),
            (DLDataTypeCode::BOOL, _) => "bool".into(),
            (c, b) => format!("DLPack type code {} with {b} bits and {lanes} lanes", c.0),
        };
        PyTypeError::new_err(format!("{name}: dtype {what} is not supported"))
    })
}

/// Imports `obj` (anything with `__dlpack__`) as the argument `name`: dtype, shape, address and
/// device, refusing non-compact (strided) tensors and devices other than the CPU and CUDA.
pub fn import(
    obj: &Bound<'_, PyAny>,
    name: &'static str,
    stream: Option<&CudaStream>,
) -> PyResult<View> {
    if !obj.hasattr("__dlpack__")? {
        return Err(PyTypeError::new_err(format!(
            "{name}: expected a tensor or array with `__dlpack__` (numpy, torch), got {}",
            obj.get_type().name()?
        )));
    }
    let stream = stream.map(|s| s as &dyn DlpackStream);
    let imported = dlpark::python::from_dlpack(obj.as_borrowed(), stream, None)
        .map_err(|e| PyTypeError::new_err(format!("{name}: DLPack import failed: {e}")))?;
    let read_only = imported.flags().contains(DlpackFlags::READ_ONLY);
    let t = imported
        .validate()
        .map_err(|e| arg_error(name, format!("invalid DLPack tensor: {e}")))?;
    let dev = t.device();
    let place = match dev.device_type {
        DLDeviceType::CPU | DLDeviceType::CUDAHOST => Place::Cpu,
        DLDeviceType::CUDA => Place::Cuda(dev.device_id),
        other => {
            return Err(arg_error(
                name,
                format!("DLPack device type {} is neither the CPU nor CUDA", other.0),
            ))
        }
    };
    let dt = t.dtype();
    let dtype = dtype_of(name, dt.code, dt.bits, dt.lanes)?;
    let shape = t
        .shape()
        .iter()
        .map(|&d| usize::try_from(d))
        .collect::<Result<Vec<usize>, _>>()
        .map_err(|_| arg_error(name, "negative dimension".into()))?;
    let compact = shape.contains(&0)
        || t.is_compact()
            .map_err(|e| arg_error(name, format!("invalid strides: {e}")))?;
    if !compact {
        return Err(arg_error(
            name,
            format!(
                "must be contiguous (row-major); strides {:?} for shape {shape:?} \
                 (call `.contiguous()` / `np.ascontiguousarray`)",
                t.strides().unwrap_or(&[])
            ),
        ));
    }
    let addr = (t.data_ptr() as u64).wrapping_add(t.byte_offset());
    Ok(View {
        name,
        dtype,
        shape,
        addr,
        place,
        read_only,
        _owner: imported,
    })
}
