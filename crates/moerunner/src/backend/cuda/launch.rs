//! Kernel launches: a kernel's typed argument struct (kernels/<stem>.rs) passed to
//! `cuLaunchKernelEx` on a given stream, with programmatic dependent launch (PDL) for kernels
//! written for it and cooperative launch for those that synchronize their grid. The one place where argument values become driver parameters.

use std::ffi::c_void;

use cudarc::driver::sys;
use cudarc::driver::CudaFunction;

use super::device::{cuda_err, Device};
use super::kernels::{Arg, KernelArgs, Shape};
use crate::error::Result;

/// A raw stream handle: the device's own, or a caller's (e.g. PyTorch's current stream).
pub type RawStream = sys::CUstream;

/// PDL is on unless `MOERUNNER_PDL=0` (a switch for measuring what it buys).
fn pdl_enabled() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| std::env::var("MOERUNNER_PDL").map_or(true, |v| v != "0"))
}

/// Launches `f` (the entry `A` describes) with `args` on `stream`. An empty grid launches nothing.
pub fn launch<A: KernelArgs>(
    dev: &Device,
    stream: RawStream,
    f: &CudaFunction,
    shape: Shape,
    args: &A,
) -> Result<()> {
    if shape.grid.0 == 0 || shape.grid.1 == 0 || shape.grid.2 == 0 {
        return Ok(());
    }
    // Each argument's value lives in `values`; the driver reads it through `params` during the call.
    let mut values: Vec<[u8; 8]> = args
        .args()
        .iter()
        .map(|a| match *a {
            Arg::Ptr(v) => v.to_le_bytes(),
            Arg::I64(v) => v.to_le_bytes(),
            Arg::I32(v) => (v as i64).to_le_bytes(),
            Arg::F32(v) => {
                let mut b = [0u8; 8];
                b[..4].copy_from_slice(&v.to_le_bytes());
                b
            }
        })
        .collect();
    let mut params: Vec<*mut c_void> = values
        .iter_mut()
        .map(|v| v.as_mut_ptr() as *mut c_void)
        .collect();
    // SAFETY: a zeroed attribute is a valid "ignore" value; each id is set with its documented field
    // (programmatic stream serialization; cooperative launch).
    let mut attrs: [sys::CUlaunchAttribute; 2] = unsafe { std::mem::zeroed() };
    let mut n_attrs = 0usize;
    if shape.pdl && A::PDL && pdl_enabled() {
        attrs[n_attrs].id =
            sys::CUlaunchAttributeID::CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION;
        attrs[n_attrs].value.programmaticStreamSerializationAllowed = 1;
        n_attrs += 1;
    }
    if A::COOPERATIVE {
        attrs[n_attrs].id = sys::CUlaunchAttributeID::CU_LAUNCH_ATTRIBUTE_COOPERATIVE;
        attrs[n_attrs].value.cooperative = 1;
        n_attrs += 1;
    }
    let config = sys::CUlaunchConfig {
        gridDimX: shape.grid.0,
        gridDimY: shape.grid.1,
        gridDimZ: shape.grid.2,
        blockDimX: shape.block,
        blockDimY: 1,
        blockDimZ: 1,
        sharedMemBytes: shape.smem,
        hStream: stream,
        attrs: if n_attrs > 0 {
            attrs.as_mut_ptr()
        } else {
            std::ptr::null_mut()
        },
        numAttrs: n_attrs as u32,
    };
    // The raw driver call needs the context current on this thread (cudarc's own calls bind it).
    dev.ctx
        .bind_to_thread()
        .map_err(|e| cuda_err("binding the CUDA context", e))?;
    // SAFETY: the values follow the entry's parameter list as `A` declares it, which
    // tests/kernel_contracts.rs checks against the `.cu` (names, types, order): 4- and 8-byte
    // values, each read by the driver from its own 8-byte slot (little-endian, so an i32 is its
    // slot's first 4 bytes). Every pointer is a live allocation of the size the kernel's contract
    // asks for (the pipeline's buffers, or a caller's under `CudaLayer::enqueue_on`'s contract).
    unsafe {
        sys::cuLaunchKernelEx(
            &config,
            f.cu_function(),
            params.as_mut_ptr(),
            std::ptr::null_mut(),
        )
    }
    .result()
    .map_err(|e| cuda_err(&format!("launching kernel `{}`", A::ENTRY), e))?;
    Ok(())
}
