//! A dense linear layer (`crate::dense::DenseLinear`) on the GPU, through the MoE's grouped GEMM run
//! as a one-expert GEMM2: no new kernel.
//!
//! - Load: the weight `[1, N, K]` prepared as a GEMM2 projection with the identity row map
//!   (`prepare::prepare_dense`: rows padded to Np = ⌈N/128⌉·128, K to Kp; mxfp8 in the decoded tiled
//!   layout, fp8_block's scales as one f32 per 8 rows × 128 columns), uploaded once; `quant.cu` and
//!   the codec's `GemmStage::DownBf16` variants at every tile width compiled (or read from the
//!   cache) then, so a call never compiles.
//! - A call: x (f32 or bf16, `[M, K]`) quantized by `quant.cu` into `[M, Kp]` (mxfp8: mode
//!   `Mxfp8AsBf16`, the exact bf16 of each quantized value; fp8_block: `E4m3Block128`, e4m3 with
//!   `[M, Kp/128]` scales), then `moe_gemm` with `EPI_DOWN`/`STORE_BF16` over a tile list made on
//!   the host: one expert (`tile_expert` 0), tiles of BN rows of x (`tile_row_start/end`),
//!   `gather_div = 0` so the activation row is the position itself and `sorted_pair` is never read,
//!   no bias, no row weight. Output `[M, Np]` bf16; the host keeps the first N columns.
//! - BN is what `pipeline.rs`'s `pick_bn` picks for M pairs on one expert: the narrowest width ≥ M,
//!   128 from M > 64 on.

use std::collections::HashMap;
use std::sync::Arc;

use cudarc::driver::CudaFunction;

use super::codec::{codec_of, Codec, PreparedScales};
use super::device::{i32_bytes, Buf, Device};
use super::kernels::moe_gemm::{self, GemmStage, GemmVariant, MoeGemm};
use super::kernels::quant::{self, QuantizeRows};
use super::kernels::{ElemCode, In, KernelArgs, ModuleKey, Out, Source};
use super::launch::launch;
use super::pipeline::load_gemm;
use super::{prepare, timing};
use crate::dense::DenseLinear;
use crate::error::{MoeError, Result};
use crate::tensor::{DType, HostTensor};

/// A `DenseLinear` resident on the GPU.
pub struct CudaDense {
    dev: Arc<Device>,
    codec: &'static Codec,
    n: usize,
    k: usize,
    /// N and K padded to 128 (the prepared weight's rows and columns).
    np: usize,
    kp: usize,
    w: Buf,
    w_scale: Option<Buf>,
    quant: CudaFunction,
    /// BN → the DownBf16 variant for it, its function, threads and dynamic shared memory.
    gemm: HashMap<u32, (GemmVariant, CudaFunction, u32, u32)>,
}

/// The device buffers of one call of M rows.
struct DenseCall {
    m: usize,
    x_dtype: DType,
    x: Buf,
    xq: Buf,
    xq_scales: Buf,
    tile_expert: Buf,
    tile_start: Buf,
    tile_end: Buf,
    num_tiles: Buf,
    tiles: usize,
    bn: u32,
    out: Buf,
}

/// The tile width for M rows of one expert: the MoE's rule with M pairs on one expert.
pub fn pick_bn(m: usize) -> u32 {
    moe_gemm::tile_width(m)
}

/// The work list of M rows of one expert in tiles of `bn`: (tile_expert, tile_row_start,
/// tile_row_end), as `sort.cu` writes it for an expert holding positions 0..M.
pub fn tile_list(m: usize, bn: usize) -> (Vec<i32>, Vec<i32>, Vec<i32>) {
    let tiles = m.div_ceil(bn.max(1));
    let start: Vec<i32> = (0..tiles).map(|t| (t * bn) as i32).collect();
    let end: Vec<i32> = (0..tiles).map(|t| ((t + 1) * bn).min(m) as i32).collect();
    (vec![0; tiles], start, end)
}

impl CudaDense {
    /// Prepares and uploads the weights and compiles (or reads from the cache) the quantizer and
    /// every GEMM variant a call may launch.
    pub fn load(dev: Arc<Device>, linear: &DenseLinear) -> Result<CudaDense> {
        let f = linear.format();
        let codec = codec_of(f.weight_format(), f.activation_format())
            .ok_or_else(|| MoeError::Cuda(format!("internal: no GPU codec for dense {f}")))?;
        let (wgmma_on, ws_on) =
            super::pipeline::main_loop_switches(&dev.arch, codec, &format!("dense {f}"))?;
        let prepared = prepare::prepare_dense(codec, linear.weights());
        let w = dev.upload(&prepared.data)?;
        let w_scale = match codec.weight_scales {
            PreparedScales::None => None,
            _ => Some(dev.upload_f32(&prepared.scales)?),
        };
        let quant = dev.function(&ModuleKey::plain(Source::Quant), QuantizeRows::ENTRY)?;
        let mut gemm = HashMap::new();
        for bn in moe_gemm::GEMM_BN {
            let v = GemmVariant::choose(codec, GemmStage::DownBf16, bn, wgmma_on, ws_on)
                .ok_or_else(|| {
                    MoeError::Cuda(format!(
                        "internal: no GEMM main loop for dense {f}, BN {bn}"
                    ))
                })?;
            let (func, threads, smem) = load_gemm(&dev, v)?;
            gemm.insert(bn, (v, func, threads, smem));
        }
        dev.sync()?;
        Ok(CudaDense {
            dev,
            codec,
            n: linear.n(),
            k: linear.k(),
            np: prepared.rows,
            kp: prepared.cols,
            w,
            w_scale,
            quant,
            gemm,
        })
    }

    pub fn device(&self) -> &Arc<Device> {
        &self.dev
    }

    /// Checks x (`[M, K]`, F32 or BF16) and allocates a call's buffers, x copied in.
    fn stage(&self, x: &HostTensor) -> Result<DenseCall> {
        x.expect_dtype("x", &[DType::F32, DType::BF16])?;
        if x.shape.len() != 2 || x.shape[1] != self.k {
            return Err(MoeError::shape(
                "x",
                format!("[M, {}] (K of the weight)", self.k),
                &x.shape,
            ));
        }
        let m = x.shape[0];
        let bn = pick_bn(m);
        let (te, ts, tend) = tile_list(m, bn as usize);
        let q = self.codec.input_quant;
        let dev = &self.dev;
        Ok(DenseCall {
            m,
            x_dtype: x.dtype,
            x: dev.upload(&x.bytes)?,
            xq: dev.alloc(m * self.kp * q.element_bytes())?,
            // (allocated even where unused: the quantizer's `out_scales` argument names it)
            xq_scales: dev.alloc(m.max(1) * q.scales_per_row(self.kp).unwrap_or(1) * 4)?,
            tile_expert: dev.upload(&i32_bytes(&te))?,
            tile_start: dev.upload(&i32_bytes(&ts))?,
            tile_end: dev.upload(&i32_bytes(&tend))?,
            num_tiles: dev.upload(&i32_bytes(&[te.len() as i32]))?,
            tiles: te.len(),
            bn,
            out: dev.alloc(m * self.np * 2)?,
        })
    }

    /// The call's launches on the device's stream (quantize, GEMM): launches only, capturable.
    fn enqueue(&self, c: &DenseCall) -> Result<()> {
        if c.m == 0 {
            return Ok(());
        }
        let dev = &*self.dev;
        let stream = dev.stream.cu_stream();
        let q = self.codec.input_quant;
        launch(
            dev,
            stream,
            &self.quant,
            quant::shape(c.m, self.kp, dev.sm_count),
            &QuantizeRows {
                x: In::new(c.x.ptr()),
                x_dtype: ElemCode::of(c.x_dtype)?.code(),
                rows: c.m as i32,
                cols: self.k as i32,
                in_stride: self.k as i64,
                out: Out::new(c.xq.ptr()),
                out_stride: self.kp as i32,
                mode: q.mode(),
                static_scale: In::new(0),
                out_scales: Out::new(c.xq_scales.ptr()),
            },
        )?;
        let (v, f, threads, smem) = self.gemm.get(&c.bn).ok_or_else(|| {
            MoeError::Cuda(format!("internal: GEMM width {} was not loaded", c.bn))
        })?;
        let act_scale = if q.scales_per_row(self.kp).is_some() {
            c.xq_scales.ptr()
        } else {
            0
        };
        launch(
            dev,
            stream,
            f,
            v.shape(*threads, *smem, self.np, c.tiles),
            &MoeGemm {
                w: In::new(self.w.ptr()),
                w_scale: In::new(self.w_scale.as_ref().map_or(0, Buf::ptr)),
                act: In::new(c.xq.ptr()),
                act_scale: In::new(act_scale),
                // never read: gather_div 0 and no row weight (the row is the position)
                sorted_pair: In::new(0),
                gather_div: 0,
                tile_expert: In::new(c.tile_expert.ptr()),
                tile_row_start: In::new(c.tile_start.ptr()),
                tile_row_end: In::new(c.tile_end.ptr()),
                num_tiles: In::new(c.num_tiles.ptr()),
                bias: In::new(0),
                row_weight: In::new(0),
                out: Out::new(c.out.ptr()),
                out_scale: In::new(0),
                Mp: self.np as i32,
                Kp: self.kp as i32,
                out_stride: self.np as i32,
                act_alpha: 0.0,
                act_beta: 0.0,
                act_limit: 0.0,
            },
        )
    }

    /// y = x · Wᵀ on the GPU: `[M, N]` row-major, the bf16 outputs widened to f32. The output
    /// buffer is filled with NaN (bf16 0xFFFF) before the kernels run, so an element the GEMM
    /// does not write shows as NaN instead of a plausible stale value.
    pub fn forward(&self, x: &HostTensor) -> Result<Vec<f32>> {
        let c = self.stage(x)?;
        timing::fill(&self.dev, &c.out, 0xFF)?;
        self.enqueue(&c)?;
        let bytes = self.dev.read(&c.out, c.m * self.np * 2)?;
        let mut out = Vec::with_capacity(c.m * self.n);
        for row in bytes.chunks_exact(self.np * 2).take(c.m) {
            out.extend(
                row[..self.n * 2]
                    .chunks_exact(2)
                    .map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32()),
            );
        }
        Ok(out)
    }

    /// Median GPU time (µs) of one call on x (quantize + GEMM), captured in a CUDA graph and
    /// replayed `iters` times with the L2 flushed before each replay (`timing::time_graph_replay_us`).
    pub fn time_us(&self, x: &HostTensor, iters: usize) -> Result<f64> {
        let c = self.stage(x)?;
        if c.m == 0 {
            return Ok(0.0);
        }
        timing::time_graph_replay_us(&self.dev, iters, &mut || self.enqueue(&c))
    }
}

/// `moerunner gemm --backend cuda`: `linear` loaded on GPU 0 (`MOERUNNER_CUDA_DEVICE` picks
/// another), its output on x, its median time, and cuBLASLt's per-tensor fp8 GEMM at the same
/// M, N, K timed the same way in the same run (the ceiling; its error when it has no algorithm).
pub fn bench(linear: &DenseLinear, x: &HostTensor, iters: usize) -> Result<super::DenseGpuReport> {
    let backend = super::create_concrete()?;
    let dev = backend.device().clone();
    let gpu = CudaDense::load(dev.clone(), linear)?;
    let output = gpu.forward(x)?;
    let median_us = gpu.time_us(x, iters)?;
    let m = x.shape.first().copied().unwrap_or(0);
    let cublas = super::ceilings::cublaslt_gemm_us(&dev, (m, linear.n(), linear.k()), true, true);
    Ok(super::DenseGpuReport {
        device: format!("GPU {}: {} ({})", dev.ordinal, dev.name, dev.arch),
        output,
        median_us,
        cublas_fp8_us: cublas.as_ref().ok().copied(),
        cublas_error: cublas.err().map(|e| e.to_string()),
    })
}
