//! Kernel launches: a typed argument list turned into cudarc's launch builder. Every device pointer
//! travels as a raw address (`Arg::Ptr`), so a kernel's nullable pointers are just `Arg::NULL`.

use cudarc::driver::{CudaFunction, LaunchConfig, PushKernelArg};

use super::device::{cuda_err, Device};
use crate::error::Result;

#[derive(Clone, Copy, Debug)]
pub enum Arg {
    Ptr(u64),
    I32(i32),
    I64(i64),
    F32(f32),
}

impl Arg {
    pub const NULL: Arg = Arg::Ptr(0);
}

/// Grid, block and dynamic shared memory of one launch.
#[derive(Clone, Copy, Debug)]
pub struct Shape {
    pub grid: (u32, u32, u32),
    pub block: u32,
    pub smem: u32,
}

pub fn launch(dev: &Device, f: &CudaFunction, shape: Shape, args: &[Arg]) -> Result<()> {
    if shape.grid.0 == 0 || shape.grid.1 == 0 || shape.grid.2 == 0 {
        return Ok(());
    }
    let mut b = dev.stream.launch_builder(f);
    for a in args {
        match a {
            Arg::Ptr(v) => b.arg(v),
            Arg::I32(v) => b.arg(v),
            Arg::I64(v) => b.arg(v),
            Arg::F32(v) => b.arg(v),
        };
    }
    let cfg = LaunchConfig {
        grid_dim: shape.grid,
        block_dim: (shape.block, 1, 1),
        shared_mem_bytes: shape.smem,
    };
    // SAFETY: argument lists are written against each kernel's documented signature (kernels/*.cu),
    // and every pointer is a live allocation of the size that signature asks for.
    unsafe { b.launch(cfg) }.map_err(|e| cuda_err("launching a kernel", e))?;
    Ok(())
}
