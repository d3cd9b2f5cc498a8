// The GEMM's compile-time configuration: the named choices a kernel is built with (-D defines, each with a
// default), the tile shape derived from them, and the checks on both. Every gemm/ piece reads its tile shape
// from the macros here (BM, BN, STAGES, WARPS_*, MG_*), so a translation unit includes this first.
//
//   WEIGHT_FORMAT  WFMT_BF16 | WFMT_E4M3_TENSOR | WFMT_E4M3_BLOCK | WFMT_MXFP8 | WFMT_MXFP4 | WFMT_NVFP4
//                  (common.cuh)   [default WFMT_BF16]
//                  each has one piece, gemm/scale_*.cuh: its element type, what a K step loads beside the
//                  operands, how a K step's partial is folded, what the epilogue multiplies by; the three
//                  microscaling formats (gemm/scale_decoded.cuh) run only on the register-sourced loops
//                  (MAINLOOP_WGMMA_RS, MAINLOOP_WGMMA_RS_WS, MAINLOOP_MMA_RS)
//   EPILOGUE       EPI_DOWN  plain rows (GEMM2): out[p*out_stride + r] = acc (+bias)          [default EPI_GATED]
//                  EPI_GATED gated GEMM1 (rows interleaved 8 gate / 8 up per 16), activation ACT, Mp/2 features
//                  EPI_RELU2 non-gated GEMM1, relu2
//   ACT            ACT_SWIGLU | ACT_GEGLU (exact erf) | ACT_SWIGLU_OAI (alpha, beta, limit)   (EPI_GATED only)
//   STORE          STORE_BF16 (round to nearest even) | STORE_F32 | STORE_E4M3 (a / out_scale[0]; GEMM1 only)
//                  [default: EPI_DOWN -> STORE_F32, else STORE_BF16]
//   MAINLOOP       MAINLOOP_MMA_SYNC    ldmatrix + mma.sync, a cp.async pipeline (gemm/mainloop_mma.cuh)
//                  MAINLOOP_WGMMA       Hopper warpgroup MMA, every thread loads (gemm/mainloop_wgmma.cuh)
//                  MAINLOOP_WGMMA_WS    warp-specialised wgmma: a loading warpgroup feeds two MMA warpgroups
//                                       through mbarriers (gemm/mainloop_wgmma_ws.cuh; BM = 128, BN = 64|128)
//                  MAINLOOP_WGMMA_RS    register-sourced wgmma: weights decoded to bf16 in registers from the
//                                       tiled layout of weight preparation (gemm/mainloop_wgmma_rs.cuh)
//                  MAINLOOP_WGMMA_RS_WS the same, warp-specialised: a loading warpgroup feeds two decoding MMA
//                                       warpgroups through the mbarrier ring (BM = 128, BN = 64|128)
//                  MAINLOOP_MMA_RS      the decoded formats without wgmma: weights decoded to bf16 A fragments
//                                       as MAINLOOP_WGMMA_RS does, activations by ldmatrix, mma.sync; any sm_80+
//                                       target (Blackwell) (gemm/mainloop_mma_rs.cuh)
//                  [default MAINLOOP_MMA_SYNC]
//   BM             64 | 128   weight rows per CTA (grid.x = Mp / BM)                  [default 128]
//   BN             8 | 16 | 32 | 64 | 128   token rows per work tile (wgmma: 16..128)  [default 64]
//   STAGES         cp.async pipeline depth, 2..8 (wgmma 3..16)   [default: mma.sync BN >= 64 ? 4 : (BM == 64 ?
//                  8 : 5); wgmma BN == 128 ? 6 : 8]
//   WG_WS_PREGS    (MAINLOOP_WGMMA_WS) producer registers (setmaxnreg.dec), a multiple of 8 in 24..168 [48]
// The host (kernels.rs, GemmVariant::defines) sets all but STAGES and WG_WS_PREGS, which only
// scripts/gpu/check_gemm.py overrides.
#pragma once

// ---- the named choices (their values are only compared with each other)
#define EPI_DOWN 0
#define EPI_GATED 1
#define EPI_RELU2 2

#define ACT_SWIGLU 0
#define ACT_GEGLU 1
#define ACT_SWIGLU_OAI 2

#define STORE_BF16 0
#define STORE_F32 1
#define STORE_E4M3 2

#define MAINLOOP_MMA_SYNC 0
#define MAINLOOP_WGMMA 1
#define MAINLOOP_WGMMA_WS 2
#define MAINLOOP_WGMMA_RS 3
#define MAINLOOP_WGMMA_RS_WS 4
#define MAINLOOP_MMA_RS 5

#ifndef WEIGHT_FORMAT
#define WEIGHT_FORMAT WFMT_BF16
#endif
#ifndef EPILOGUE
#define EPILOGUE EPI_GATED
#endif
#ifndef ACT
#define ACT ACT_SWIGLU
#endif
#ifndef STORE
#define STORE (EPILOGUE == EPI_DOWN ? STORE_F32 : STORE_BF16)
#endif
#ifndef MAINLOOP
#define MAINLOOP MAINLOOP_MMA_SYNC
#endif
#ifndef BM
#define BM 128
#endif
#ifndef BN
#define BN 64
#endif
#ifndef WG_WS_PREGS
#define WG_WS_PREGS 48  // 40 made the block-scale loader spill
#endif

// FOLD_K32 (WFMT_E4M3_BLOCK on wgmma): fold every 32-wide K sub-step instead of every 128-wide step
#ifndef FOLD_K32
#define FOLD_K32 0
#endif

// the weight format folds each K step's partial into the sum: Fmt::FOLD_EACH_STEP for the one place that must
// choose by preprocessor (gemm/mainloop_mma.cuh checks the two agree)
#define MG_FOLD_EACH_STEP (WEIGHT_FORMAT == WFMT_E4M3_BLOCK)
// wgmma main loops (all four): the operand tiles are read through descriptors, the warp grid is BM/16 x 1 x 1
#define MG_WGMMA (MAINLOOP != MAINLOOP_MMA_SYNC && MAINLOOP != MAINLOOP_MMA_RS)
#define MG_WS (MAINLOOP == MAINLOOP_WGMMA_WS || MAINLOOP == MAINLOOP_WGMMA_RS_WS)
// register-sourced loops (the decoded formats'): the tiled weight layout, A fragments decoded in registers, the
// warp grid BM/16 x 1 x 1 (a warp decodes its 16 rows once for every column), 1024-aligned activation tiles
#define MG_RS (MAINLOOP == MAINLOOP_WGMMA_RS || MAINLOOP == MAINLOOP_WGMMA_RS_WS || MAINLOOP == MAINLOOP_MMA_RS)
#define MG_DECODED (WEIGHT_FORMAT >= WFMT_MXFP8)

// consumer registers (setmaxnreg.inc): the CTA's register pool is what it was launched with, 384 threads x 168
// (__launch_bounds__(384, 1): 65536 / 384 rounded down to 8; ptxas reports 168 for every WS variant); the
// consumers may take what the producer gave back, a multiple of 8 (an .inc beyond the pool never returns):
// producer 40 -> consumers 232, 48 -> 224
#define MG_WS_CREGS MG_MIN(240, ((168 * 384 - 128 * WG_WS_PREGS) / 256) & ~7)
#ifndef STAGES
#if MG_WGMMA
#define STAGES (BN == 128 ? 6 : 8)
#elif MAINLOOP == MAINLOOP_MMA_RS
#define STAGES (BN == 128 ? 4 : 6)
#elif BN >= 64
#define STAGES 4
#elif BM == 64
#define STAGES 8
#else
#define STAGES 5
#endif
#endif

// ---- mma.sync warp grid WARPS_M x WARPS_N x WARPS_K (wgmma: BM/16 x 1 x 1, warpgroup q owns rows 64q..64q+63).
// WARPS_K > 1 splits the 4 k-sub-steps of each 128-byte K step between warps and reduces through shared
// memory in a fixed order (deterministic). Warp tiles, 8 warps:
//   BN=128: 2x4x1 (BM=128: 64x32, BM=64: 32x32); per-tensor e4m3 with BM=128: 4x2x1 (32x64)
//   BN=64 : BM=128 4x2x1 (32x32);  BM=64 2x2x2 (32x32)
//   BN=32 : BM=128 4x1x2 (32x32);  BM=64 4x1x2 (16x32)
//   BN=8/16: BM=128 8x1x1 (16xBN); BM=64 4x1x2 (16xBN)
#if MG_WGMMA || MG_RS
#define WARPS_M (BM / 16)
#define WARPS_N 1
#define WARPS_K 1
#elif BN >= 128 && WEIGHT_FORMAT == WFMT_E4M3_TENSOR && BM == 128
#define WARPS_M 4
#define WARPS_N 2
#define WARPS_K 1
#elif BN >= 128
#define WARPS_M 2
#define WARPS_N 4
#define WARPS_K 1
#elif BN == 64 && BM == 128
#define WARPS_M 4
#define WARPS_N 2
#define WARPS_K 1
#elif BN == 64
#define WARPS_M 2
#define WARPS_N 2
#define WARPS_K 2
#elif BN == 32
#define WARPS_M 4
#define WARPS_N 1
#define WARPS_K 2
#elif BM == 128  // BN = 8 | 16
#define WARPS_M 8
#define WARPS_N 1
#define WARPS_K 1
#else
#define WARPS_M 4
#define WARPS_N 1
#define WARPS_K 2
#endif

#define MG_NWARPS (WARPS_M * WARPS_N * WARPS_K)
#if MG_WS
#define MG_NTHREADS (MG_NWARPS * 32 + 128)  // + the producer warpgroup (MG_NWARPS: the consumer warps)
#define MG_LDT 128                          // loader threads
#else
#define MG_NTHREADS (MG_NWARPS * 32)
#define MG_LDT MG_NTHREADS
#endif
#define MG_WTM (BM / WARPS_M)          // warp tile rows
#define MG_WTN (BN / WARPS_N)          // warp tile columns
#define MG_MT (MG_WTM / 16)            // m16 tiles per warp
#define MG_NTL (MG_WTN / 8)            // n8 tiles per warp
#define MG_KPW (4 / WARPS_K)           // k-sub-steps per warp per stage
// one stage's weight tile: 128 bytes a row, or (decoded formats) one 64-element K step's element and scale
// bytes a row (gemm/scale_decoded.cuh)
#if MG_RS
// (a number, not Fmt's members: format pieces that are not templates expand this too; scale_decoded.cuh checks it)
#if WEIGHT_FORMAT == WFMT_MXFP8
#define MG_DEC_ROW_BYTES 66
#elif WEIGHT_FORMAT == WFMT_MXFP4
#define MG_DEC_ROW_BYTES 34
#else
#define MG_DEC_ROW_BYTES 36
#endif
#define MG_SW_BYTES (BM * MG_DEC_ROW_BYTES)
#else
#define MG_SW_BYTES (BM * 128)
#endif
#define MG_SA_BYTES (BN * 128)         // one stage's activation tile
#define MG_MAX(a, b) ((a) > (b) ? (a) : (b))
#define MG_MIN(a, b) ((a) < (b) ? (a) : (b))
// Dynamic shared memory: STAGES x (weight tile, activation tile, the weight format's scales of the step
// (Fmt::STAGE_SCALE_FLOATS floats)); mma.sync with WARPS_K > 1 reuses it for the reduction; wgmma adds
// 1024 bytes of slack to align the operand tiles to 1024 bytes (128B swizzle atoms).
#define MG_SS_FLOATS (Fmt::STAGE_SCALE_FLOATS)
#define MG_PIPE_BYTES (STAGES * (MG_SW_BYTES + MG_SA_BYTES + MG_SS_FLOATS * 4))
#define MG_RED_BYTES ((WARPS_K - 1) * BM * BN * 4)
#if MG_WGMMA || MG_RS
#define MG_SMEM_BYTES (MG_PIPE_BYTES + 1024)
#else
#define MG_SMEM_BYTES MG_MAX(MG_PIPE_BYTES, MG_RED_BYTES)
#endif

static_assert(WEIGHT_FORMAT >= WFMT_BF16 && WEIGHT_FORMAT <= WFMT_NVFP4, "WEIGHT_FORMAT: one of WFMT_*");
static_assert(MG_DECODED == MG_RS, "the microscaling formats run on the register-sourced loops, and only they do");
static_assert(EPILOGUE >= EPI_DOWN && EPILOGUE <= EPI_RELU2, "EPILOGUE: one of EPI_*");
static_assert(ACT >= ACT_SWIGLU && ACT <= ACT_SWIGLU_OAI, "ACT: one of ACT_*");
static_assert(STORE >= STORE_BF16 && STORE <= STORE_E4M3, "STORE: one of STORE_*");
static_assert(EPILOGUE != EPI_DOWN || STORE != STORE_E4M3, "EPI_DOWN stores bf16 or f32");
static_assert(MAINLOOP >= MAINLOOP_MMA_SYNC && MAINLOOP <= MAINLOOP_MMA_RS, "MAINLOOP: one of MAINLOOP_*");
static_assert(BM == 64 || BM == 128, "BM must be 64 or 128");
static_assert(BN == 8 || BN == 16 || BN == 32 || BN == 64 || BN == 128, "BN must be 8, 16, 32, 64 or 128");
static_assert(STAGES >= 2 && STAGES <= (MG_WGMMA ? 16 : 8), "STAGES must be 2..8 (wgmma: 3..16)");
static_assert(MAINLOOP != MAINLOOP_MMA_RS || STAGES >= 3, "MAINLOOP_MMA_RS needs STAGES >= 3");
static_assert(WARPS_K == 1 || WARPS_K == 2 || WARPS_K == 4, "WARPS_K must be 1, 2 or 4");
static_assert(BM % (16 * WARPS_M) == 0, "BM must be a multiple of 16*WARPS_M");
static_assert(BN % (8 * WARPS_N) == 0, "BN must be a multiple of 8*WARPS_N");
static_assert(MG_NTHREADS % 64 == 0 && MG_NTHREADS <= 1024, "thread count must be a multiple of 64");
static_assert((BM * 8) % MG_LDT == 0, "weight tile chunks must divide evenly between threads");
static_assert(BN <= MG_NTHREADS, "BN must not exceed the thread count");
static_assert(MG_NTL == 1 || MG_NTL % 2 == 0, "n8 tiles per warp must be 1 or even");
#if MG_WGMMA
static_assert(BN == 16 || BN == 32 || BN == 64 || BN == 128, "wgmma needs BN = 16, 32, 64 or 128");
static_assert((MG_RS || MG_SW_BYTES % 1024 == 0) && MG_SA_BYTES % 1024 == 0,
              "wgmma: operand tiles read through descriptors must keep 1024-byte alignment");
static_assert(STAGES >= 3, "wgmma needs STAGES >= 3 (prefetch distance STAGES - 2)");
#endif
static_assert(WG_WS_PREGS >= 24 && WG_WS_PREGS <= 168 && WG_WS_PREGS % 8 == 0, "WG_WS_PREGS: 24..168, a multiple of 8");
static_assert(!MG_WS || (BM == 128 && (BN == 64 || BN == 128)), "the warp-specialised loops need BM=128, BN=64|128");
