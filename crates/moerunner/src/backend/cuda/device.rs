//! The device layer over cudarc (dynamically loaded): context and stream, architecture, device
//! buffers, and the module cache (NVRTC-compiled kernels, loaded once per process and device).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use cudarc::driver::sys::{self, CUdevice_attribute_enum as Attr};
use cudarc::driver::{CudaContext, CudaFunction, CudaModule, CudaSlice, CudaStream, DevicePtr};
use cudarc::nvrtc::Ptx;

use super::kernels::ModuleKey;
use super::nvrtc;
use crate::error::{MoeError, Result};

pub fn cuda_err(what: &str, e: impl std::fmt::Debug) -> MoeError {
    MoeError::Cuda(format!("{what}: {e:?}"))
}

/// The NVRTC target for a compute capability: the arch-specific "a" targets where they exist, since
/// wgmma/setmaxnreg (Hopper) and tcgen05 (Blackwell) need them.
pub fn arch_for(major: i32, minor: i32) -> String {
    match (major, minor) {
        (9, 0) | (10, 0) | (10, 3) | (12, 0) => format!("sm_{major}{minor}a"),
        _ => format!("sm_{major}{minor}"),
    }
}

pub struct Device {
    pub ctx: Arc<CudaContext>,
    pub stream: Arc<CudaStream>,
    pub ordinal: usize,
    pub name: String,
    pub arch: String,
    pub sm_count: u32,
    pub total_memory: usize,
    modules: Mutex<HashMap<ModuleKey, Arc<CudaModule>>>,
}

impl Device {
    /// Opens GPU `ordinal`, or says why there is none (no driver library, no device, no NVRTC).
    pub fn open(ordinal: usize) -> Result<Arc<Device>> {
        // SAFETY: only tries to dlopen libcuda; calling into a missing library would panic.
        if !unsafe { sys::is_culib_present() } {
            return Err(MoeError::Cuda(
                "no NVIDIA driver library (libcuda.so) on this machine".into(),
            ));
        }
        let count = CudaContext::device_count()
            .map_err(|e| cuda_err("no usable GPU (cuInit/cuDeviceGetCount)", e))?;
        if count <= 0 {
            return Err(MoeError::Cuda("the NVIDIA driver sees no GPU".into()));
        }
        if ordinal >= count as usize {
            return Err(MoeError::Cuda(format!(
                "GPU {ordinal} asked for, but the driver sees {count}"
            )));
        }
        if !nvrtc::available() {
            return Err(MoeError::Cuda(
                "libnvrtc (CUDA 13) was not found, so kernels cannot be compiled; put it on LD_LIBRARY_PATH".into(),
            ));
        }
        let ctx = CudaContext::new(ordinal).map_err(|e| cuda_err("creating a CUDA context", e))?;
        // One stream, ordered work: cudarc's per-buffer event tracking is not needed and would
        // add event records inside graph capture.
        // SAFETY: no buffers exist yet.
        unsafe { ctx.disable_event_tracking() };
        let attr = |a: Attr| {
            ctx.attribute(a)
                .map_err(|e| cuda_err("reading a device attribute", e))
        };
        let major = attr(Attr::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR)?;
        let minor = attr(Attr::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR)?;
        let sm_count = attr(Attr::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)? as u32;
        if major < 9 {
            return Err(MoeError::Cuda(format!(
                "compute capability {major}.{minor}: the kernels need sm_90 (Hopper) or newer"
            )));
        }
        let name = ctx
            .name()
            .map_err(|e| cuda_err("reading the device name", e))?;
        let total_memory = ctx.total_mem().unwrap_or(0);
        let stream = ctx
            .new_stream()
            .map_err(|e| cuda_err("creating a stream", e))?;
        Ok(Arc::new(Device {
            ctx,
            stream,
            ordinal,
            name,
            arch: arch_for(major, minor),
            sm_count,
            total_memory,
            modules: Mutex::new(HashMap::new()),
        }))
    }

    /// The kernel `func` of module `key`, compiling (or reading the disk cache) on first use.
    pub fn function(&self, key: &ModuleKey, func: &str) -> Result<CudaFunction> {
        let mut modules = self
            .modules
            .lock()
            .map_err(|_| MoeError::Cuda("module cache poisoned".into()))?;
        let module = match modules.get(key) {
            Some(m) => m.clone(),
            None => {
                let compiled = nvrtc::compile_module(key, &self.arch)?;
                let m = self
                    .ctx
                    .load_module(Ptx::from_binary(compiled.cubin))
                    .map_err(|e| {
                        cuda_err(&format!("loading kernel module `{}`", key.label()), e)
                    })?;
                modules.insert(key.clone(), m.clone());
                m
            }
        };
        let f = module
            .load_function(func)
            .map_err(|e| cuda_err(&format!("kernel `{func}` in module `{}`", key.label()), e))?;
        Ok(f)
    }

    /// Reads the `__constant__ int name[n]` of module `key` (kernels export their launch shape so).
    pub fn module_ints(
        &self,
        key: &ModuleKey,
        entry: &str,
        name: &str,
        n: usize,
    ) -> Result<Vec<i32>> {
        self.function(key, entry)?;
        let module = {
            let modules = self
                .modules
                .lock()
                .map_err(|_| MoeError::Cuda("module cache poisoned".into()))?;
            modules.get(key).cloned().ok_or_else(|| {
                MoeError::Cuda(format!("internal: module `{}` not loaded", key.label()))
            })?
        };
        let view = module
            .get_global(name, &self.stream)
            .map_err(|e| cuda_err(&format!("symbol `{name}` of module `{}`", key.label()), e))?;
        if view.len() < n * 4 {
            return Err(MoeError::Cuda(format!(
                "symbol `{name}` of module `{}` holds {} bytes, not {}",
                key.label(),
                view.len(),
                n * 4
            )));
        }
        let mut bytes = vec![0u8; n * 4];
        self.stream
            .memcpy_dtoh(&view.slice(0..n * 4), &mut bytes)
            .map_err(|e| cuda_err("reading a module constant", e))?;
        self.sync()?;
        Ok(le_words(&bytes, i32::from_le_bytes))
    }

    pub fn alloc(&self, bytes: usize) -> Result<Buf> {
        // At least one byte, so every buffer has a valid distinct address.
        let slice = self
            .stream
            .alloc_zeros::<u8>(bytes.max(1))
            .map_err(|e| cuda_err(&format!("allocating {bytes} bytes of GPU memory"), e))?;
        Ok(Buf { slice, len: bytes })
    }

    pub fn upload(&self, bytes: &[u8]) -> Result<Buf> {
        let mut b = self.alloc(bytes.len())?;
        self.write(&mut b, 0, bytes)?;
        Ok(b)
    }

    pub fn upload_f32(&self, v: &[f32]) -> Result<Buf> {
        self.upload(&f32_bytes(v))
    }

    /// Copies `bytes` into `buf` at `offset` (asynchronous with respect to the device queue, ordered
    /// on the stream; the host slice is copied before return by the driver for pageable memory).
    pub fn write(&self, buf: &mut Buf, offset: usize, bytes: &[u8]) -> Result<()> {
        if bytes.is_empty() {
            return Ok(());
        }
        if offset + bytes.len() > buf.len {
            return Err(MoeError::Cuda(format!(
                "internal: write of {} bytes at {offset} into a buffer of {}",
                bytes.len(),
                buf.len
            )));
        }
        let mut view = buf.slice.slice_mut(offset..offset + bytes.len());
        self.stream
            .memcpy_htod(bytes, &mut view)
            .map_err(|e| cuda_err("copying to the GPU", e))
    }

    pub fn read(&self, buf: &Buf, bytes: usize) -> Result<Vec<u8>> {
        let mut out = vec![0u8; bytes];
        if bytes == 0 {
            return Ok(out);
        }
        let view = buf.slice.slice(0..bytes);
        self.stream
            .memcpy_dtoh(&view, &mut out)
            .map_err(|e| cuda_err("copying from the GPU", e))?;
        self.sync()?;
        Ok(out)
    }

    pub fn sync(&self) -> Result<()> {
        self.stream
            .synchronize()
            .map_err(|e| cuda_err("a GPU kernel failed", e))
    }
}

/// A device allocation of raw bytes; kernels receive its address.
pub struct Buf {
    slice: CudaSlice<u8>,
    pub len: usize,
}

impl Buf {
    pub fn ptr(&self) -> u64 {
        let (p, _sync) = self.slice.device_ptr(self.slice.stream());
        p
    }
    pub fn slice(&self) -> &CudaSlice<u8> {
        &self.slice
    }
    pub fn slice_mut(&mut self) -> &mut CudaSlice<u8> {
        &mut self.slice
    }
}

pub fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// Little-endian 4-byte words as values (`i32::from_le_bytes`, `f32::from_le_bytes`); a short tail
/// is dropped.
pub fn le_words<T>(bytes: &[u8], from: fn([u8; 4]) -> T) -> Vec<T> {
    bytes
        .chunks_exact(4)
        .map(|c| from([c[0], c[1], c[2], c[3]]))
        .collect()
}

pub fn i32_bytes(v: &[i32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}
