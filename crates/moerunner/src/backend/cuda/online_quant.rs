//! Online weight quantization on the GPU: bf16 (or f32) expert weights `[E, rows, cols]` in device
//! memory into the canonical layout of a weight format — bit for bit what
//! `formats::weight_quant::quantize_weights` produces on the CPU (that function is the definition;
//! `kernels/weight_quant.cu` says how each rule is kept on the device). For RL trainers that push
//! fresh bf16 weights every step, and for `run --checkpoint --quantize` on a GPU.
//!
//! - [`WeightQuantizer`]: the compiled kernels on one device. `quantize` (device source → host
//!   [`QuantizedTensor`]), `quantize_to_device` (outputs left on the GPU), `quantize_host` (a host
//!   tensor of any format, uploaded expert chunk by expert chunk; non-bf16 formats are decoded to f32
//!   on the CPU first), `enqueue` (launches only, for timing).
//! - [`quantize_on_device`] / [`quantize_host_tensor`]: the same as one call.
//! - A non-finite weight is refused (the CPU quantizer refuses it too): the kernels record the
//!   first one's index, and the host returns an error naming the tensor and the element.
//! - bf16 as a target is not a quantization: refused here (`supports`), the CPU pass does it.

use std::marker::PhantomData;
use std::sync::Arc;

use cudarc::driver::CudaFunction;

use super::device::{f32_bytes, Buf, Device};
use super::kernels::weight_quant::{
    block128_shape, rows_shape, QuantizeWeightBlock128, QuantizeWeightRows, RowsMode, WeightAmax,
    MAX_EXPERTS_PER_LAUNCH,
};
use super::kernels::{ElemCode, In, KernelArgs, ModuleKey, Out, Source};
use super::launch::launch;
use super::timing::fill;
use crate::config::WeightFormat;
use crate::error::{MoeError, Result};
use crate::formats::weight_quant::FP8_BLOCK;
use crate::tensor::DType;
use crate::weights::{BlockScales, QuantizedTensor};

/// Staging for `quantize_host`: at most this many source bytes are uploaded per launch sequence.
const HOST_CHUNK_BYTES: usize = 256 << 20;

/// bf16 or f32 expert weights `[experts, rows, cols]`, row-major, in device memory.
#[derive(Clone, Copy, Debug)]
pub struct WeightSource<'a> {
    ptr: u64,
    dtype: DType,
    pub experts: usize,
    pub rows: usize,
    pub cols: usize,
    _buf: PhantomData<&'a Buf>,
}

impl<'a> WeightSource<'a> {
    /// Weights held in `buf` (checked: dtype bf16 or f32, and the shape fits the buffer).
    pub fn from_buf(
        buf: &'a Buf,
        dtype: DType,
        experts: usize,
        rows: usize,
        cols: usize,
    ) -> Result<WeightSource<'a>> {
        let s = WeightSource {
            ptr: buf.ptr(),
            dtype,
            experts,
            rows,
            cols,
            _buf: PhantomData,
        };
        let bytes = s.bytes()?;
        if bytes > buf.len {
            return Err(MoeError::invalid(
                "online quantization: the source buffer",
                format!(
                    "[{experts}, {rows}, {cols}] {} needs {bytes} bytes, the buffer holds {}",
                    dtype.name(),
                    buf.len
                ),
            ));
        }
        Ok(s)
    }

    /// Weights at a caller's device address (a PyTorch tensor's, say).
    ///
    /// # Safety
    /// `ptr` must be device memory of the quantizer's device holding `experts · rows · cols`
    /// elements of `dtype`, already written (work on other streams that produces it finished: the
    /// quantizer runs on the device's own stream) and live and unchanged until the quantization
    /// has returned (`enqueue`: until the device's stream has run it).
    pub unsafe fn from_raw(
        ptr: u64,
        dtype: DType,
        experts: usize,
        rows: usize,
        cols: usize,
    ) -> Result<WeightSource<'static>> {
        let s = WeightSource {
            ptr,
            dtype,
            experts,
            rows,
            cols,
            _buf: PhantomData,
        };
        s.bytes()?;
        let align = s.elem_bytes() as u64;
        if ptr == 0 || !ptr.is_multiple_of(align) {
            return Err(MoeError::invalid(
                "online quantization: the source address",
                format!("{ptr:#x} is null or not aligned to its {align}-byte elements"),
            ));
        }
        Ok(s)
    }

    fn elem_bytes(&self) -> usize {
        if self.dtype == DType::F32 {
            4
        } else {
            2
        }
    }

    /// The byte size, once dtype and shape are checked.
    fn bytes(&self) -> Result<usize> {
        if !matches!(self.dtype, DType::BF16 | DType::F32) {
            return Err(MoeError::invalid(
                "online quantization: the source dtype",
                format!("{} (bf16 or f32 weights only)", self.dtype.name()),
            ));
        }
        element_count(self.experts, self.rows, self.cols)?
            .checked_mul(self.elem_bytes())
            .ok_or_else(|| overflow(self.experts, self.rows, self.cols))
    }

    fn expert_ptr(&self, e: usize) -> u64 {
        self.ptr + (e * self.rows * self.cols * self.elem_bytes()) as u64
    }
}

fn overflow(experts: usize, rows: usize, cols: usize) -> MoeError {
    MoeError::invalid(
        "online quantization: the shape",
        format!("[{experts}, {rows}, {cols}] overflows"),
    )
}

fn element_count(experts: usize, rows: usize, cols: usize) -> Result<usize> {
    experts
        .checked_mul(rows)
        .and_then(|n| n.checked_mul(cols))
        .ok_or_else(|| overflow(experts, rows, cols))
}

/// One quantized tensor's buffers on the GPU (the canonical layout, as `QuantizedTensor` holds it),
/// with the kernels' scratch (per-expert amax, the non-finite index).
pub struct DeviceQuantized {
    pub format: WeightFormat,
    pub experts: usize,
    pub rows: usize,
    pub cols: usize,
    /// The elements: e4m3 bytes, or packed e2m1 pairs.
    pub data: Buf,
    /// fp8_block: f32 `[E, ceil(rows/128), ceil(cols/128)]`; mxfp8/mxfp4: UE8M0 bytes `[E, rows,
    /// cols/32]`; nvfp4: E4M3 bytes `[E, rows, cols/16]`; empty for fp8.
    pub block_scales: Buf,
    /// fp8: s per expert; nvfp4: g per expert (f32); empty otherwise.
    pub expert_scales: Buf,
    amax: Buf,
    bad: Buf,
    given_globals: Option<(Buf, Vec<f32>)>,
}

/// Element bytes of `[experts, rows, cols]` in `format` (bf16 is not quantized here).
fn data_bytes(format: WeightFormat, experts: usize, rows: usize, cols: usize) -> usize {
    let n = experts * rows * cols;
    if format.is_fp4() {
        n / 2
    } else {
        n
    }
}

/// Block-scale bytes of `[experts, rows, cols]` in `format`.
fn block_scale_bytes(format: WeightFormat, experts: usize, rows: usize, cols: usize) -> usize {
    let n = experts * rows * cols;
    match format {
        WeightFormat::Fp8Block => experts * rows.div_ceil(FP8_BLOCK) * cols.div_ceil(FP8_BLOCK) * 4,
        WeightFormat::Mxfp8 | WeightFormat::Mxfp4 => n / 32,
        WeightFormat::Nvfp4 => n / 16,
        WeightFormat::Bf16 | WeightFormat::Fp8 => 0,
    }
}

impl DeviceQuantized {
    fn data_bytes(&self) -> usize {
        data_bytes(self.format, self.experts, self.rows, self.cols)
    }

    fn block_scale_bytes(&self) -> usize {
        block_scale_bytes(self.format, self.experts, self.rows, self.cols)
    }

    fn has_expert_scales(&self) -> bool {
        matches!(self.format, WeightFormat::Fp8 | WeightFormat::Nvfp4)
    }

    /// Bytes the quantizer writes: elements, block scales and per-expert scales.
    pub fn output_bytes(&self) -> usize {
        self.data_bytes()
            + self.block_scale_bytes()
            + if self.has_expert_scales() {
                4 * self.experts
            } else {
                0
            }
    }

    /// Launch sequences that read the source twice (an expert-wide amax first): fp8 per-tensor,
    /// and nvfp4 without given globals.
    pub fn two_pass(&self) -> bool {
        self.format == WeightFormat::Fp8
            || (self.format == WeightFormat::Nvfp4 && self.given_globals.is_none())
    }

    /// Clears the per-expert amax and the non-finite index (stream-ordered): before `enqueue`.
    pub fn reset(&self, dev: &Device) -> Result<()> {
        fill(dev, &self.amax, 0)?;
        fill(dev, &self.bad, 0xff)
    }

    /// Waits for the GPU and refuses the tensor if the kernels saw a non-finite weight.
    pub fn check_finite(&self, dev: &Device, name: &str) -> Result<()> {
        let bytes = dev.read(&self.bad, 8)?;
        let mut word = [0u8; 8];
        word.copy_from_slice(&bytes);
        let index = u64::from_le_bytes(word);
        if index == u64::MAX {
            return Ok(());
        }
        let i = index as usize;
        let per = (self.rows * self.cols).max(1);
        let cols = self.cols.max(1);
        Err(MoeError::invalid(
            format!("weights `{name}`"),
            format!(
                "element [{}, {}, {}] is not a finite number (inf or NaN): refused by the GPU \
                 quantizer into {}, as quantize_weights refuses it",
                i / per,
                (i % per) / cols,
                i % cols,
                self.format
            ),
        ))
    }

    /// Copies the result to the host (waits for the GPU).
    pub fn download(&self, dev: &Device) -> Result<QuantizedTensor> {
        let data = dev.read(&self.data, self.data_bytes())?;
        let block = dev.read(&self.block_scales, self.block_scale_bytes())?;
        let per_expert = if self.has_expert_scales() {
            floats(&dev.read(&self.expert_scales, 4 * self.experts)?)
        } else {
            Vec::new()
        };
        let (scales, global_scales) = match self.format {
            WeightFormat::Fp8 => (BlockScales::PerExpert(per_expert), Vec::new()),
            WeightFormat::Fp8Block => (BlockScales::Block128(floats(&block)), Vec::new()),
            WeightFormat::Mxfp8 | WeightFormat::Mxfp4 => (BlockScales::Ue8m0(block), Vec::new()),
            WeightFormat::Nvfp4 => (BlockScales::E4m3(block), per_expert),
            WeightFormat::Bf16 => (BlockScales::None, Vec::new()),
        };
        Ok(QuantizedTensor {
            format: self.format,
            experts: self.experts,
            rows: self.rows,
            cols: self.cols,
            data: data.into(),
            scales,
            global_scales,
        })
    }
}

fn floats(bytes: &[u8]) -> Vec<f32> {
    bytes
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

/// The weight quantization kernels, compiled for one device.
pub struct WeightQuantizer {
    dev: Arc<Device>,
    amax: CudaFunction,
    rows: CudaFunction,
    block128: CudaFunction,
}

impl WeightQuantizer {
    /// Compiles (or takes from the cache) `weight_quant.cu` for `dev`.
    pub fn new(dev: Arc<Device>) -> Result<WeightQuantizer> {
        let key = ModuleKey::plain(Source::WeightQuant);
        Ok(WeightQuantizer {
            amax: dev.function(&key, WeightAmax::ENTRY)?,
            rows: dev.function(&key, QuantizeWeightRows::ENTRY)?,
            block128: dev.function(&key, QuantizeWeightBlock128::ENTRY)?,
            dev,
        })
    }

    pub fn device(&self) -> &Arc<Device> {
        &self.dev
    }

    /// Whether `format` is quantized here (every quantized format; bf16 is not one).
    pub fn supports_format(format: WeightFormat) -> bool {
        format != WeightFormat::Bf16
    }

    /// Output buffers for `[experts, rows, cols]` in `format`, after the checks of
    /// `quantize_weights` (shape, K blocking, nvfp4's given globals: one per expert, finite and
    /// positive; ignored by the other formats) and the launch limits.
    pub fn alloc_output(
        &self,
        format: WeightFormat,
        experts: usize,
        rows: usize,
        cols: usize,
        global_scales: Option<&[f32]>,
    ) -> Result<DeviceQuantized> {
        check_shape(format, experts, rows, cols)?;
        let given = match (format, global_scales) {
            (WeightFormat::Nvfp4, Some(g)) => Some(checked_globals(g, experts)?),
            _ => None,
        };
        let dev = &self.dev;
        Ok(DeviceQuantized {
            format,
            experts,
            rows,
            cols,
            data: dev.alloc(data_bytes(format, experts, rows, cols))?,
            block_scales: dev.alloc(block_scale_bytes(format, experts, rows, cols))?,
            expert_scales: dev.alloc(4 * experts)?,
            amax: dev.alloc(4 * experts)?,
            bad: dev.alloc(8)?,
            given_globals: match given {
                Some(g) => Some((dev.upload_f32(&g)?, g)),
                None => None,
            },
        })
    }

    /// Enqueues the quantization of `src` into experts `first_expert..` of `out` on the device's
    /// stream: launches only (no wait, no check). Call `out.reset` once before the first chunk and
    /// `out.check_finite` after the last.
    pub fn enqueue(
        &self,
        src: &WeightSource<'_>,
        out: &DeviceQuantized,
        first_expert: usize,
    ) -> Result<()> {
        if (src.rows, src.cols) != (out.rows, out.cols)
            || first_expert
                .checked_add(src.experts)
                .is_none_or(|end| end > out.experts)
        {
            return Err(MoeError::Cuda(format!(
                "internal: source [{}, {}, {}] at expert {first_expert} does not fit an output of \
                 [{}, {}, {}]",
                src.experts, src.rows, src.cols, out.experts, out.rows, out.cols
            )));
        }
        let dev = &*self.dev;
        let stream = dev.stream.cu_stream();
        let (rows, cols) = (out.rows, out.cols);
        let per_expert = rows * cols;
        let dtype = ElemCode::of(src.dtype)?.code();
        let data_per_expert = out.data_bytes() / out.experts.max(1);
        let scales_per_expert = out.block_scale_bytes() / out.experts.max(1);
        let mut start = 0;
        while start < src.experts {
            let count = (src.experts - start).min(MAX_EXPERTS_PER_LAUNCH);
            let e0 = first_expert + start;
            let at = |b: &Buf, per: usize| b.ptr() + (e0 * per) as u64;
            let src_ptr = In::new(src.expert_ptr(start));
            let bad = Out::new(out.bad.ptr());
            match RowsMode::of(out.format) {
                None => launch(
                    dev,
                    stream,
                    &self.block128,
                    block128_shape(count, rows, cols),
                    &QuantizeWeightBlock128 {
                        src: src_ptr,
                        src_dtype: dtype,
                        rows: rows as i32,
                        cols: cols as i32,
                        first_expert: e0 as i32,
                        out: Out::new(at(&out.data, data_per_expert)),
                        scales: Out::new(at(&out.block_scales, scales_per_expert)),
                        bad,
                    },
                )?,
                Some(mode) => {
                    let shape = rows_shape(count, per_expert, dev.sm_count);
                    let amax = at(&out.amax, 4);
                    if out.two_pass() {
                        launch(
                            dev,
                            stream,
                            &self.amax,
                            shape,
                            &WeightAmax {
                                src: src_ptr,
                                src_dtype: dtype,
                                per_expert: per_expert as i64,
                                first_expert: e0 as i32,
                                amax_bits: Out::new(amax),
                                bad,
                            },
                        )?;
                    }
                    let given = match &out.given_globals {
                        Some((g, _)) => In::new(at(g, 4)),
                        None => In::NULL,
                    };
                    launch(
                        dev,
                        stream,
                        &self.rows,
                        shape,
                        &QuantizeWeightRows {
                            src: src_ptr,
                            src_dtype: dtype,
                            per_expert: per_expert as i64,
                            mode: mode.mode(),
                            first_expert: e0 as i32,
                            amax_bits: In::new(amax),
                            given_globals: given,
                            out: Out::new(at(&out.data, data_per_expert)),
                            block_scales: Out::new(at(&out.block_scales, scales_per_expert)),
                            expert_scales: Out::new(at(&out.expert_scales, 4)),
                            bad,
                        },
                    )?;
                }
            }
            start += count;
        }
        Ok(())
    }

    /// Quantizes `src` into `format`, the result left on the GPU; `name` names the tensor in errors.
    pub fn quantize_to_device(
        &self,
        src: &WeightSource<'_>,
        format: WeightFormat,
        global_scales: Option<&[f32]>,
        name: &str,
    ) -> Result<DeviceQuantized> {
        let out = self.alloc_output(format, src.experts, src.rows, src.cols, global_scales)?;
        out.reset(&self.dev)?;
        self.enqueue(src, &out, 0)?;
        out.check_finite(&self.dev, name)?;
        Ok(out)
    }

    /// Quantizes `src` into `format` and copies the result to the host: what `quantize_weights`
    /// returns for the same values.
    pub fn quantize(
        &self,
        src: &WeightSource<'_>,
        format: WeightFormat,
        global_scales: Option<&[f32]>,
        name: &str,
    ) -> Result<QuantizedTensor> {
        self.quantize_to_device(src, format, global_scales, name)?
            .download(&self.dev)
    }

    /// Quantizes a host tensor `t` (any format) into `format`: bf16 data is uploaded as it is,
    /// other formats are decoded to f32 on the CPU (`decode_rows_f32`, as the CPU pass of
    /// `checkpoint --quantize` does) — in chunks of experts of at most 256 MiB of source.
    pub fn quantize_host(
        &self,
        t: &QuantizedTensor,
        format: WeightFormat,
        global_scales: Option<&[f32]>,
        name: &str,
    ) -> Result<QuantizedTensor> {
        self.quantize_host_in_chunks(t, format, global_scales, name, HOST_CHUNK_BYTES)
    }

    /// [`quantize_host`](Self::quantize_host) with at most `chunk_bytes` of source per upload (at
    /// least one expert): tests use small chunks to cover several launch sequences.
    pub fn quantize_host_in_chunks(
        &self,
        t: &QuantizedTensor,
        format: WeightFormat,
        global_scales: Option<&[f32]>,
        name: &str,
        chunk_bytes: usize,
    ) -> Result<QuantizedTensor> {
        let dev = &*self.dev;
        let out = self.alloc_output(format, t.experts, t.rows, t.cols, global_scales)?;
        out.reset(dev)?;
        let (dtype, elem) = if t.format == WeightFormat::Bf16 {
            (DType::BF16, 2)
        } else {
            (DType::F32, 4)
        };
        if dtype == DType::BF16 && t.data.len() != t.experts * t.rows * t.cols * 2 {
            return Err(MoeError::invalid(
                format!("weights `{name}`"),
                format!(
                    "{} bytes of bf16 data for [{}, {}, {}]",
                    t.data.len(),
                    t.experts,
                    t.rows,
                    t.cols
                ),
            ));
        }
        let expert_bytes = (t.rows * t.cols * elem).max(1);
        let per_chunk = (chunk_bytes / expert_bytes).clamp(1, t.experts.max(1));
        let mut staging = dev.alloc(per_chunk * expert_bytes)?;
        let mut values = Vec::new();
        // Experts without elements have nothing to quantize (and no bytes to slice).
        let mut start = if t.rows * t.cols == 0 { t.experts } else { 0 };
        while start < t.experts {
            let count = per_chunk.min(t.experts - start);
            if dtype == DType::BF16 {
                let bytes = &t.data[start * expert_bytes..(start + count) * expert_bytes];
                dev.write(&mut staging, 0, bytes)?;
            } else {
                values.resize(count * t.rows * t.cols, 0f32);
                for (i, chunk) in values.chunks_mut((t.rows * t.cols).max(1)).enumerate() {
                    t.decode_rows_f32(start + i, 0..t.rows, chunk);
                }
                dev.write(&mut staging, 0, &f32_bytes(&values))?;
            }
            let src = WeightSource::from_buf(&staging, dtype, count, t.rows, t.cols)?;
            self.enqueue(&src, &out, start)?;
            // The next chunk's copy into `staging` is ordered after these launches on the stream.
            start += count;
        }
        out.check_finite(dev, name)?;
        out.download(dev)
    }
}

impl std::fmt::Debug for WeightQuantizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "WeightQuantizer(GPU {}: {})",
            self.dev.ordinal, self.dev.name
        )
    }
}

/// `checkpoint::load_layer`'s `--quantize` pass on the GPU (`LoadOptions::quantizer`).
impl crate::checkpoint::ExpertQuantizer for WeightQuantizer {
    fn supports(&self, format: WeightFormat) -> bool {
        WeightQuantizer::supports_format(format)
    }
    fn quantize(
        &self,
        t: &QuantizedTensor,
        format: WeightFormat,
        name: &str,
    ) -> Result<QuantizedTensor> {
        self.quantize_host(t, format, None, name)
    }
}

/// `quantize_weights`' shape checks, and the kernels' limits (i32 rows and columns, grid sizes).
fn check_shape(format: WeightFormat, experts: usize, rows: usize, cols: usize) -> Result<()> {
    if !WeightQuantizer::supports_format(format) {
        return Err(MoeError::Unsupported(format!(
            "online quantization into {format}: not a quantized format (the CPU pass converts to bf16)"
        )));
    }
    element_count(experts, rows, cols)?;
    if let Some(block) = format.k_block().filter(|&b| b <= 32) {
        if !cols.is_multiple_of(block) {
            return Err(MoeError::invalid(
                "quantize_weights: K (`cols`)",
                format!("{format} needs K = {cols} to be a multiple of {block}"),
            ));
        }
    }
    let limit = i32::MAX as usize;
    if experts > limit || rows > limit || cols > limit || rows.div_ceil(FP8_BLOCK) > 65535 {
        return Err(MoeError::invalid(
            "online quantization: the shape",
            format!("[{experts}, {rows}, {cols}] is beyond the kernels' launch limits"),
        ));
    }
    Ok(())
}

/// nvfp4's given globals, checked as `quantize_weights` checks them.
fn checked_globals(g: &[f32], experts: usize) -> Result<Vec<f32>> {
    crate::formats::weight_quant::checked_global_scales(g, experts)
}

/// [`WeightQuantizer::quantize`] as one call (the kernels are compiled once per device and process).
pub fn quantize_on_device(
    dev: &Arc<Device>,
    src: &WeightSource<'_>,
    format: WeightFormat,
    global_scales: Option<&[f32]>,
    name: &str,
) -> Result<QuantizedTensor> {
    WeightQuantizer::new(dev.clone())?.quantize(src, format, global_scales, name)
}

/// [`WeightQuantizer::quantize_host`] as one call.
pub fn quantize_host_tensor(
    dev: &Arc<Device>,
    t: &QuantizedTensor,
    format: WeightFormat,
    global_scales: Option<&[f32]>,
    name: &str,
) -> Result<QuantizedTensor> {
    WeightQuantizer::new(dev.clone())?.quantize_host(t, format, global_scales, name)
}
