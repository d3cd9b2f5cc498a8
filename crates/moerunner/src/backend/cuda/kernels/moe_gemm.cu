// Grouped MoE GEMM (GEMM1 with the fused activation, or GEMM2), tensor cores through mma.sync or, on sm_90a,
// wgmma.
//
// One CTA computes a BM (weight rows = output features) x BN (sorted (token, slot) positions) tile of one
// expert: acc[r][p] = sum_k W[e][r][k] * act[row(p)][k], f32 accumulation. Weight rows sit on the MMA's
// M side and tokens on its N side ("swap AB"), so both operands are K-contiguous in global and shared
// memory and one non-transposed ldmatrix serves both.
//
// ---------------------------------------------------------------------------------------------------
// Compile-time defines, every one with a default. The host (kernels.rs) sets W_FP8, EPI, ACT, OUT_TYPE, BM,
// BN, WGMMA and WG_WS, and CI compiles every combination it launches (ModuleKey::all()); STAGES and
// WG_WS_PREGS keep their defaults there and are overridden only by scripts/gpu/check_gemm.py (which also
// runs BN = 8):
//   W_FP8     0 = bf16 weights and activations (mma m16n8k16 bf16)             [default 0]
//             1 = e4m3 weights and activations, per-tensor scales (mma m16n8k32 e4m3)
//             2 = e4m3, block scales: weights one f32 per 8 prepared rows x 128 K, activations per row x 128 K
//   EPI       0 = plain (GEMM2): out[p*out_stride + r] = acc (+bias), f32 or bf16 (OUT_TYPE)   [default 1]
//             1 = gated GEMM1 (rows interleaved 8 gate / 8 up per 16), activation ACT, Mp/2 output features
//             2 = non-gated GEMM1, relu2
//   ACT       0 = swiglu, 1 = geglu (exact erf), 2 = swiglu_oai (alpha, beta, limit)   (EPI=1 only) [default 0]
//   OUT_TYPE  0 = bf16 (round to nearest even), 1 = f32, 2 = e4m3 of a / out_scale[0] (EPI 1/2 only)
//             [default: EPI 0 -> 1 (f32), EPI 1/2 -> 0]. Each thread stores its own fragments (staging
//             GEMM2's rows through shared memory for 16-byte stores did not beat that on an H200).
//   BM        64 | 128   weight rows per CTA (grid.x = Mp / BM)                  [default 128]
//   BN        8 | 16 | 32 | 64 | 128   positions per work tile                   [default 64]
//   STAGES    2..8   cp.async pipeline depth   [default: BN >= 64 ? 4 : (BM == 64 ? 8 : 5)]
//   WGMMA     1 = Hopper warpgroup MMA (sm_90a wgmma.mma_async) instead of ldmatrix + mma.sync   [default 0]
//             BM = 64 | 128 with BN = 16 | 32 | 64 | 128 (any W_FP8 / EPI / ACT / OUT_TYPE). BM / 64
//             warpgroups (BM = 128: 256 threads, BM = 64: 128 threads); warpgroup q owns weight rows
//             64q..64q+63 and issues per 128-byte K step four wgmma m64n{BN}k16 bf16 (W_FP8 = 0) or
//             m64n{BN}k32 e4m3 (W_FP8 = 1/2), f32 accumulators, both operands read from shared memory
//             through matrix descriptors (K-major, 128-byte swizzle, stride byte offset 1024: the layout
//             below IS the 128B swizzle atom once every operand tile base is 1024-byte aligned, which the
//             kernel guarantees by rounding the dynamic shared memory base up, hence the +1024 bytes;
//             BM*128 and BN*128 are multiples of 1024 for BN >= 8). The same cp.async producer loop (every
//             thread loads), then fence.proxy.async.shared::cta (cp.async writes are generic-proxy, wgmma
//             reads through the async proxy; CUTLASS's cp.async + GMMA mainloop has no such fence, kept to
//             be safe) and __syncthreads. The wgmma of step ks stays in flight while step ks+1 is issued
//             (wgmma.wait_group 1), so a stage is refilled two steps after it was consumed: prefetch
//             distance STAGES - 2.
//             W_FP8 = 2 (MG_PROMOTE): each K step's wgmma accumulate a fresh partial set, which is waited
//             for (wait_group 0) and folded into the f32 sum, scaled by w_scale(row group of 8) *
//             act_scale(row), before the next step is issued. The tensor cores idle during the fold;
//             overlapping it with the next step (two partial sets) needed 240 registers against 183 and
//             ran 8 % slower on an H200. W_FP8 = 1 accumulates all of K in the wgmma accumulator, which
//             keeps only ~14 bits for e4m3: the host keeps per-tensor fp8 on mma.sync (kernels.rs,
//             GemmVariant::choose).
//             Warp w holds accumulator rows 16w + g, 16w + g + 8 (g = lane/4) and columns 8j + 2(lane%4)
//             + {0,1}: the mma.sync m16n8 fragment layout per n8 tile, so the epilogue is shared
//             (reported warp grid BM/16 x 1 x 1). STAGES default: 6 (BN = 128) / 8 (BN <= 64), minimum 3,
//             at most 16 (narrow tiles stream weights: e.g. BM=64 BN=16 8 stages = 80 KB, two blocks/SM).
//   WG_WS     (WGMMA=1, BM=128, BN=64|128) 1 = warp-specialised: 384 threads, warpgroups 0 and 1
//             consume (wgmma, as above: warpgroup q owns weight rows 64q..64q+63, the epilogue is the same),
//             warpgroup 2 only loads (the same cp.async gather / zero fill, 128 loader threads) into a ring of
//             STAGES slots; mbarriers instead of __syncthreads: full[s] and empty[s]. Each producer thread
//             waits for its cp.async group of step j (wait_group, STAGES - 2 groups behind the newest) and
//             fences (fence.proxy.async.shared::cta), then lane 0 of each producer warp arrives on full[j]
//             (after __syncwarp: one arrival per producer warp). Each consumer warp arrives on empty[s] once
//             the wgmma reading the slot were retired by wgmma.wait_group (and for W_FP8=2 the fold read
//             its scales). setmaxnreg: producer 48, consumers 224 (WG_WS_PREGS=40: 232; the pool is
//             the launch's 384 x 168). Unpromoted, the consumers keep one K step's wgmma in flight (slot
//             released one step late, so all STAGES - 2 other slots are loading); W_FP8 = 2 waits for and
//             folds every step as above.   [default 0]
//   WG_WS_PREGS (WG_WS=1) producer registers (setmaxnreg.dec), a multiple of 8 in 24..168   [default 48]
//
// Derived from the defines above (not overridable):
//   WARPS_M, WARPS_N, WARPS_K   mma.sync warp grid (WGMMA=1: BM/16 x 1 x 1).
//             WARPS_K > 1 splits the 4 MMA k-sub-steps of each 128-byte K step between warps and reduces
//             through shared memory in a fixed order (deterministic).
//             Constraints: BM % (16*WARPS_M) == 0, BN % (8*WARPS_N) == 0, WARPS_K in {1,2,4},
//             (32*WARPS_M*WARPS_N*WARPS_K) % 64 == 0 and >= BM/8 + BN when W_FP8 == 2.
//             Table (WM x WN x WK, warp tile), 8 warps:
//               BN=128: 2x4x1 (BM=128: 64x32, BM=64: 32x32); W_FP8=1 with BM=128: 4x2x1 (32x64)
//               BN=64 : BM=128 4x2x1 (32x32);  BM=64 2x2x2 (32x32)
//               BN=32 : BM=128 4x1x2 (32x32);  BM=64 4x1x2 (16x32)
//               BN=8/16: BM=128 8x1x1 (16xBN); BM=64 4x1x2 (16xBN)
//   FRAG_DB   1 = explicit register double buffering of the mma.sync fragments:
//             W_FP8 == 0, and W_FP8 == 2 with BM = BN = 128 (fewest spills there)
//             (on sm_90 ptxas emulates the e4m3 mma.sync with F2FP unpacks + f16 HMMA; the extra
//             registers of the double buffer make the 128x128 fp8 tile spill, so fp8 leaves it off)
//
// Block: NTHREADS = 32 * WARPS_M * WARPS_N * WARPS_K threads (256; WGMMA=1: 2 * BM, + 128 with WG_WS),
// grid (Mp/BM, max_tiles).
// Dynamic shared memory (bytes):
//   PIPE = STAGES * (BM*128 + BN*128 + (W_FP8 == 2 ? 4*(BM/8 + BN) : 0))
//   RED  = (WARPS_K - 1) * BM * BN * 4
//   SMEM = max(PIPE, RED)                 (+ 8*BN bytes of static shared memory; + 8*(2*STAGES+1) with WG_WS)
//   WGMMA = 1: SMEM = PIPE + 1024 (alignment slack), e.g. BN=128 6 stages: 197632,
//              W_FP8=2: 197632 + 6*4*144 = 201088; BN=64 8 stages: 197632 (W_FP8=2: 200192);
//              BM=64 8 stages: BN=16 82944 (W_FP8=2: 83712), BN=32 99328 (W_FP8=2: 100608);
//              BM=128 8 stages: BN=16 148480 (W_FP8=2: 149504), BN=32 164864 (W_FP8=2: 166400)
// e.g. BM=128 BN=128: 4*32768 = 131072 (W_FP8=2: 131072 + 4*4*144 = 133376); BM=64 BN=8: 8*9216 = 73728.
// The same numbers are exported as `moe_gemm_meta` = {NTHREADS, SMEM, BM, BN, STAGES, WARPS_M, WARPS_N,
// WARPS_K} (an extern "C" __constant__ int[8]; read it with cuModuleGetGlobal + cuMemcpyDtoH if wanted).
//
// Data layout in shared memory: per stage a W tile [BM][128 B] and an act tile [BN][128 B]; each 128-byte
// row holds eight 16-byte chunks, chunk c of row r stored at chunk slot c ^ (r & 7) (XOR swizzle), so the
// 8 row addresses of every ldmatrix phase hit 8 distinct 16-byte bank groups, and so do the cp.async
// writes. One K step = 128 bytes = 64 bf16 or 128 e4m3 = 4 MMA k-sub-steps of 32 bytes (k16 bf16 / k32 e4m3;
// both fragments have the same 32-bit-word layout, so the byte-level tiling is shared).
//
// Where a faster path would go: on sm_90a TMA loads instead of cp.async (wgmma and the warp-specialised
// mbarrier ring are here already); on sm_100a tcgen05.mma with the accumulator in tensor memory. The
// epilogue below would stay.
// ---------------------------------------------------------------------------------------------------

#ifndef W_FP8
#define W_FP8 0
#endif
#ifndef EPI
#define EPI 1
#endif
#ifndef ACT
#define ACT 0
#endif
#ifndef OUT_TYPE
#define OUT_TYPE (EPI == 0 ? 1 : 0)
#endif
#ifndef BM
#define BM 128
#endif
#ifndef BN
#define BN 64
#endif
#ifndef WGMMA
#define WGMMA 0
#endif
#ifndef WG_WS
#define WG_WS 0
#endif
#ifndef WG_WS_PREGS
#define WG_WS_PREGS 48  // producer registers (setmaxnreg.dec); 40 made the W_FP8=2 loader spill
#endif
// consumer registers (setmaxnreg.inc): the CTA's register pool is what it was launched with, 384 threads x 168
// (__launch_bounds__(384, 1): 65536 / 384 rounded down to 8; ptxas reports 168 for every WS variant); the
// consumers may take what the producer gave back, a multiple of 8 (an .inc beyond the pool never returns):
// producer 40 -> consumers 232, 48 -> 224
#define MG_WS_CREGS MG_MIN(240, ((168 * 384 - 128 * WG_WS_PREGS) / 256) & ~7)
// WGMMA=1 with block scales accumulates each K step into a fresh partial that is folded into the f32 sum
#define MG_PROMOTE (WGMMA && W_FP8 == 2)
#ifndef STAGES
#if WGMMA
#define STAGES (BN == 128 ? 6 : 8)
#elif BN >= 64
#define STAGES 4
#elif BM == 64
#define STAGES 8
#else
#define STAGES 5
#endif
#endif
#define FRAG_DB (W_FP8 == 0 || (W_FP8 == 2 && BM == 128 && BN == 128))

#if WGMMA
// BM / 64 warpgroups, each warp owns 16 weight rows x all BN columns (see WGMMA above)
#define WARPS_M (BM / 16)
#define WARPS_N 1
#define WARPS_K 1
#elif BN >= 128 && W_FP8 == 1 && BM == 128
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
#if WG_WS
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
#define MG_ESZ (W_FP8 ? 1 : 2)         // element bytes
#define MG_PREFETCH_L2_BYTES (32ll << 20)  // under the L2 of H100 (50 MB) and H200 (60 MB)
#define MG_SW_BYTES (BM * 128)
#define MG_SA_BYTES (BN * 128)
#define MG_SS_FLOATS (W_FP8 == 2 ? (BM / 8 + BN) : 0)
#define MG_PIPE_BYTES (STAGES * (MG_SW_BYTES + MG_SA_BYTES + MG_SS_FLOATS * 4))
#define MG_RED_BYTES ((WARPS_K - 1) * BM * BN * 4)
#define MG_MAX(a, b) ((a) > (b) ? (a) : (b))
#define MG_MIN(a, b) ((a) < (b) ? (a) : (b))
#if WGMMA
#define MG_SMEM_BYTES (MG_PIPE_BYTES + 1024)  // + slack to align the operand tiles to 1024 bytes
#else
#define MG_SMEM_BYTES MG_MAX(MG_PIPE_BYTES, MG_RED_BYTES)
#endif

static_assert(W_FP8 >= 0 && W_FP8 <= 2, "W_FP8 must be 0, 1 or 2");
static_assert(EPI >= 0 && EPI <= 2, "EPI must be 0, 1 or 2");
static_assert(ACT >= 0 && ACT <= 2, "ACT must be 0, 1 or 2");
static_assert(OUT_TYPE >= 0 && OUT_TYPE <= 2, "OUT_TYPE must be 0, 1 or 2");
static_assert(EPI != 0 || OUT_TYPE <= 1, "EPI=0 stores bf16 (OUT_TYPE=0) or f32 (OUT_TYPE=1)");
static_assert(BM == 64 || BM == 128, "BM must be 64 or 128");
static_assert(BN == 8 || BN == 16 || BN == 32 || BN == 64 || BN == 128, "BN must be 8, 16, 32, 64 or 128");
static_assert(STAGES >= 2 && STAGES <= (WGMMA ? 16 : 8), "STAGES must be 2..8 (WGMMA=1: 3..16)");
static_assert(WARPS_K == 1 || WARPS_K == 2 || WARPS_K == 4, "WARPS_K must be 1, 2 or 4");
static_assert(BM % (16 * WARPS_M) == 0, "BM must be a multiple of 16*WARPS_M");
static_assert(BN % (8 * WARPS_N) == 0, "BN must be a multiple of 8*WARPS_N");
static_assert(MG_NTHREADS % 64 == 0 && MG_NTHREADS <= 1024, "thread count must be a multiple of 64");
static_assert((BM * 8) % MG_LDT == 0, "weight tile chunks must divide evenly between threads");
static_assert(BN <= MG_NTHREADS, "BN must not exceed the thread count");
static_assert(W_FP8 != 2 || MG_LDT >= BM / 8 + BN || (WG_WS && 2 * MG_LDT >= BM / 8 + BN),
              "not enough threads to load the block scales");
static_assert(MG_NTL == 1 || MG_NTL % 2 == 0, "n8 tiles per warp must be 1 or even");
static_assert(WGMMA == 0 || WGMMA == 1, "WGMMA must be 0 or 1");
#if WGMMA
static_assert(BN == 16 || BN == 32 || BN == 64 || BN == 128, "WGMMA=1 needs BN = 16, 32, 64 or 128");
static_assert(MG_SW_BYTES % 1024 == 0 && MG_SA_BYTES % 1024 == 0, "WGMMA=1: operand tiles must keep 1024-byte alignment");
static_assert(STAGES >= 3, "WGMMA=1 needs STAGES >= 3 (prefetch distance STAGES - 2)");
static_assert(MG_SMEM_BYTES <= 232448, "WGMMA=1: too many stages for 227 KB of shared memory");
#endif
static_assert(WG_WS == 0 || WG_WS == 1, "WG_WS must be 0 or 1");
static_assert(WG_WS_PREGS >= 24 && WG_WS_PREGS <= 168 && WG_WS_PREGS % 8 == 0, "WG_WS_PREGS: 24..168, a multiple of 8");
static_assert(WG_WS == 0 || (WGMMA && BM == 128 && (BN == 64 || BN == 128)), "WG_WS=1 needs WGMMA=1, BM=128, BN=64|128");

extern "C" {
__constant__ int moe_gemm_meta[8] = {MG_NTHREADS, MG_SMEM_BYTES, BM, BN, STAGES, WARPS_M, WARPS_N, WARPS_K};
}

// ------------------------------------------------------------------------------------------ PTX helpers

__device__ __forceinline__ u32 mg_smem_addr(const void* p) {
    u32 r;
    asm("{ .reg .u64 t; cvta.to.shared.u64 t, %1; cvt.u32.u64 %0, t; }" : "=r"(r) : "l"(p));
    return r;
}

// 16-byte async copy global -> shared, L2 prefetch of the surrounding 256-byte block (weights: streamed).
__device__ __forceinline__ void mg_cp16(u32 dst, const void* src) {
    asm volatile("cp.async.cg.shared.global.L2::256B [%0], [%1], 16;\n" ::"r"(dst), "l"(src) : "memory");
}

// 16-byte async copy with source size (16 = copy, 0 = zero fill, nothing read).
__device__ __forceinline__ void mg_cp16z(u32 dst, const void* src, u32 src_bytes) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(src_bytes) : "memory");
}

// 4-byte async copy with source size (4 or 0).
__device__ __forceinline__ void mg_cp4z(u32 dst, const void* src, u32 src_bytes) {
    asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(dst), "l"(src), "r"(src_bytes) : "memory");
}

__device__ __forceinline__ void mg_cp_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }

template <int N>
__device__ __forceinline__ void mg_cp_wait() {
    asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

__device__ __forceinline__ void mg_ldsm_x4(u32 addr, u32& r0, u32& r1, u32& r2, u32& r3) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r0), "=r"(r1), "=r"(r2), "=r"(r3)
                 : "r"(addr)
                 : "memory");
}

__device__ __forceinline__ void mg_ldsm_x2(u32 addr, u32& r0, u32& r1) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x2.shared.b16 {%0, %1}, [%2];\n"
                 : "=r"(r0), "=r"(r1)
                 : "r"(addr)
                 : "memory");
}

// D = A * B + D, A 16 x (32 bytes of K) row-major, B (32 bytes of K) x 8 column-major.
__device__ __forceinline__ void mg_mma(float* c, const u32* a, u32 b0, u32 b1) {
#if W_FP8
    asm volatile(
        "mma.sync.aligned.m16n8k32.row.col.f32.e4m3.e4m3.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
#else
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
#endif
}

#if WGMMA
// ------------------------------------------------------------------------------------------ wgmma (sm_90a)

// Shared-memory matrix descriptor: start address >> 4 (bits 0-13), leading byte offset >> 4 (bits 16-29;
// unused for K-major swizzled operands, set to 1), stride byte offset >> 4 (bits 32-45: 1024 = one 8-row x
// 128-byte swizzle atom), base offset 0 (bits 49-51; the atoms are 1024-byte aligned), swizzle mode 1 =
// 128B (bits 62-63). Advancing K by 32 bytes inside the atom adds 2 to the start address field (the
// hardware applies the XOR on the address bits, as the loader did).
__device__ __forceinline__ u64 mg_desc(u32 saddr) {
    return (u64)((saddr & 0x3FFFFu) >> 4) | ((u64)1 << 16) | ((u64)(1024 >> 4) << 32) | ((u64)1 << 62);
}

__device__ __forceinline__ void mg_wg_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void mg_wg_commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
template <int N>
__device__ __forceinline__ void mg_wg_wait() {
    asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
}
// cp.async writes are generic-proxy writes; wgmma reads shared memory through the async proxy.
__device__ __forceinline__ void mg_fence_proxy_async() { asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory"); }
#if WG_WS
// mbarriers (shared::cta): init with an expected arrival count, arrive (release.cta), wait for the phase of a
// parity to complete (acquire.cta); predicated arrive keeps the consumer loop straight-line (no branch)
__device__ __forceinline__ void mg_mbar_init(u32 bar, u32 count) {
    asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;" ::"r"(bar), "r"(count) : "memory");
}
__device__ __forceinline__ void mg_mbar_arrive_if(u32 bar, bool pred) {
    asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %1, 0;\n@p mbarrier.arrive.shared::cta.b64 _, [%0];\n}\n"
                 ::"r"(bar), "r"((u32)pred) : "memory");
}
__device__ __forceinline__ void mg_mbar_wait(u32 bar, u32 parity) {
    u32 ok;
    do {
        asm volatile("{\n.reg .pred p;\nmbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\nselp.u32 %0, 1, 0, p;\n}\n"
                     : "=r"(ok) : "r"(bar), "r"(parity) : "memory");
    } while (!ok);
}
template <int N>
__device__ __forceinline__ void mg_setmaxnreg_inc() {
    asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" ::"n"(N));
}
template <int N>
__device__ __forceinline__ void mg_setmaxnreg_dec() {
    asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" ::"n"(N));
}
#endif
// keeps the compiler from moving accumulator accesses across the wgmma fence / wait points
__device__ __forceinline__ void mg_reg_fence(float& x) { asm volatile("" : "+f"(x)::"memory"); }

// D(64 x BN, f32) (+)= A(64 x K-step, weights) * B(K-step x BN, tokens); scale_d = 0: D = A * B.
#if W_FP8 == 0 && BN == 128
__device__ __forceinline__ void mg_wgmma(float* d, u64 da, u64 db, int scale_d) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %66, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 "
        "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}, "
        "%64, %65, p, 1, 1, 0, 0;\n}\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]),
          "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]),
          "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]),
          "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]),
          "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]),
          "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]),
          "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]),
          "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63])
        : "l"(da), "l"(db), "r"(scale_d));
}
#elif W_FP8 == 0 && BN == 64
__device__ __forceinline__ void mg_wgmma(float* d, u64 da, u64 db, int scale_d) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %34, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 "
        "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}, "
        "%32, %33, p, 1, 1, 0, 0;\n}\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]),
          "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]),
          "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]),
          "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31])
        : "l"(da), "l"(db), "r"(scale_d));
}
#elif W_FP8 && BN == 128
__device__ __forceinline__ void mg_wgmma(float* d, u64 da, u64 db, int scale_d) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %66, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n128k32.f32.e4m3.e4m3 "
        "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}, "
        "%64, %65, p, 1, 1;\n}\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]),
          "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]),
          "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]),
          "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]),
          "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]),
          "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]),
          "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]),
          "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63])
        : "l"(da), "l"(db), "r"(scale_d));
}
#elif W_FP8 && BN == 64
__device__ __forceinline__ void mg_wgmma(float* d, u64 da, u64 db, int scale_d) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %34, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n64k32.f32.e4m3.e4m3 "
        "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}, "
        "%32, %33, p, 1, 1;\n}\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]),
          "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]),
          "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]),
          "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31])
        : "l"(da), "l"(db), "r"(scale_d));
}
#elif W_FP8 == 0 && BN == 32
__device__ __forceinline__ void mg_wgmma(float* d, u64 da, u64 db, int scale_d) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %18, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n32k16.f32.bf16.bf16 "
        "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15}, "
        "%16, %17, p, 1, 1, 0, 0;\n}\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]),
          "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15])
        : "l"(da), "l"(db), "r"(scale_d));
}
#elif W_FP8 == 0 && BN == 16
__device__ __forceinline__ void mg_wgmma(float* d, u64 da, u64 db, int scale_d) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %10, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n16k16.f32.bf16.bf16 "
        "{%0, %1, %2, %3, %4, %5, %6, %7}, "
        "%8, %9, p, 1, 1, 0, 0;\n}\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7])
        : "l"(da), "l"(db), "r"(scale_d));
}
#elif W_FP8 && BN == 32
__device__ __forceinline__ void mg_wgmma(float* d, u64 da, u64 db, int scale_d) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %18, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n32k32.f32.e4m3.e4m3 "
        "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15}, "
        "%16, %17, p, 1, 1;\n}\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]),
          "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15])
        : "l"(da), "l"(db), "r"(scale_d));
}
#elif W_FP8 && BN == 16
__device__ __forceinline__ void mg_wgmma(float* d, u64 da, u64 db, int scale_d) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %10, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n16k32.f32.e4m3.e4m3 "
        "{%0, %1, %2, %3, %4, %5, %6, %7}, "
        "%8, %9, p, 1, 1;\n}\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7])
        : "l"(da), "l"(db), "r"(scale_d));
}
#endif
#endif

// ------------------------------------------------------------------------------------------ epilogue math

__device__ __forceinline__ float mg_act(float g, float u, float alpha, float beta, float limit) {
#if ACT == 0
    return __fdiv_rn(g, 1.0f + __expf(-g)) * u;
#elif ACT == 1
    return 0.5f * g * (1.0f + erff(g * 0.70710678118654752440f)) * u;
#else
    const float gc = fminf(g, limit);
    const float uc = fminf(fmaxf(u, -limit), limit);
    const float sig = __fdiv_rn(1.0f, 1.0f + __expf(-alpha * gc));
    return gc * sig * (uc + beta);
#endif
}

__device__ __forceinline__ void mg_store(void* out, long long idx, float a, float oscale) {
#if OUT_TYPE == 1
    ((float*)out)[idx] = a;
#elif OUT_TYPE == 0
    ((u16*)out)[idx] = f32_to_bf16(a);
#else
    ((u8*)out)[idx] = f32_to_e4m3(__fdiv_rn(a, oscale));
#endif
}

// ------------------------------------------------------------------------------------------ the kernel

extern "C" __global__ void __launch_bounds__(MG_NTHREADS, 1) moe_gemm(
    const u8* __restrict__ w, const float* __restrict__ w_scale, const u8* __restrict__ act,
    const float* __restrict__ act_scale, const int* __restrict__ sorted_pair, int gather_div,
    const int* __restrict__ tile_expert, const int* __restrict__ tile_row_start,
    const int* __restrict__ tile_row_end, const int* __restrict__ num_tiles, const float* __restrict__ bias,
    const float* __restrict__ row_weight, void* __restrict__ out, const float* __restrict__ out_scale, int Mp,
    int Kp, int out_stride, float act_alpha, float act_beta, float act_limit) {
    const int y = blockIdx.y;
    // The tile list comes from the sort kernel, which completed before our predecessor (quantize,
    // GEMM1 or the requantization) passed its own pdl_wait: it may be read before ours. So may the
    // weights, which no kernel writes: pull this block's rows towards L2 while the predecessor ends.
    if (y >= num_tiles[0]) {
        pdl_wait();  // keep completion transitive (common.cuh) even for an idle block
        return;
    }
    const int e = tile_expert[y];
    const int row0 = tile_row_start[y];
    const int nrows = min(tile_row_end[y] - row0, BN);
    const int m_base = blockIdx.x * BM;
    // Only when every tile's weights fit in L2 together (decode: a few experts); beyond that the
    // prefetch would evict what other blocks are about to read (measured: T=16 on qwen3-30b-a3b
    // ran 12 % slower with it).
    if (threadIdx.x == 0 && nrows > 0 &&
        (long long)num_tiles[0] * Mp * Kp * MG_ESZ <= MG_PREFETCH_L2_BYTES) {
        const long long row_bytes = (long long)Kp * MG_ESZ;
        const u8* first = w + ((long long)e * Mp + m_base) * row_bytes;
        asm volatile("cp.async.bulk.prefetch.L2.global [%0], %1;" ::"l"(first), "r"((u32)(BM * row_bytes)) : "memory");
    }
    pdl_wait();  // activations, row weights and the output buffers belong to earlier kernels
    pdl_launch_dependents();
    if (nrows <= 0) return;

    __shared__ int s_row[BN];     // activation row of each tile column, -1 when missing
    __shared__ float s_rw[BN];    // Llama-4 row weight of each tile column (1 when none)
    extern __shared__ __align__(128) u8 smem[];

    const int tid = threadIdx.x;
    const int lane = tid & 31;
    const int warp = tid >> 5;
#if WG_WS
    // full[s] (s < STAGES), empty[s], and a spare one (arrived on in place of a release that has no slot)
    __shared__ __align__(8) u64 s_bar[2 * STAGES + 1];
    const u32 bar_full = mg_smem_addr(&s_bar[0]);
    const u32 bar_empty = bar_full + 8 * STAGES;
    const u32 bar_spare = bar_full + 16 * STAGES;
    if (tid == 0) {
#pragma unroll
        for (int s = 0; s < STAGES; ++s) {
            mg_mbar_init(bar_full + 8 * s, MG_LDT / 32);  // lane 0 of each producer warp
            mg_mbar_init(bar_empty + 8 * s, MG_NWARPS);
        }
        mg_mbar_init(bar_spare, MG_NWARPS);
        asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
    }
    // loader thread index (warpgroup 2 loads; the consumers' copy of the setup below is never used)
    const int ltid = tid & (MG_LDT - 1);
#else
    const int ltid = tid;
#endif

    if (tid < BN) {
        int r = -1;
        float rw = 1.0f;
        if (tid < nrows) {
            const int p = row0 + tid;
            if (gather_div > 0 || row_weight != nullptr) {
                const int pair = sorted_pair[p];
                r = gather_div > 0 ? pair / gather_div : p;
                if (row_weight != nullptr) rw = row_weight[pair];
            } else {
                r = p;
            }
        }
        s_row[tid] = r;
        s_rw[tid] = rw;
    }
    __syncthreads();

    // ---- loader setup: thread owns chunk (tid & 7) of rows (tid >> 3) + i * NTHREADS/8
    const long long kbytes = (long long)Kp * MG_ESZ;  // bytes per row
    const int nk = (int)(kbytes >> 7);                // 128-byte K steps
    const int ld_c = ltid & 7;
    const int ld_r = ltid >> 3;
    constexpr int ROWS_PER_PASS = MG_LDT / 8;         // a multiple of 8: the swizzle is the same each pass
    const u32 swz = (u32)(((ld_c ^ (ld_r & 7)) << 4));

#if WGMMA
    // operand tiles must sit on 1024-byte boundaries (128B swizzle atoms): round the base up (slack in SMEM)
    u8* const smem_al = smem + ((((mg_smem_addr(smem) + 1023u) & ~1023u)) - mg_smem_addr(smem));
    const u32 sW = mg_smem_addr(smem_al);
#else
    const u32 sW = mg_smem_addr(smem);
#endif
    const u32 sA = sW + STAGES * MG_SW_BYTES;
#if W_FP8 == 2
    const u32 sS = sA + STAGES * MG_SA_BYTES;
#endif

    constexpr int WCH = BM * 8 / MG_LDT;
    const u8* wsrc = w + ((long long)e * Mp + m_base + ld_r) * kbytes + ld_c * 16;
    const long long wpass = (long long)ROWS_PER_PASS * kbytes;
    const u32 wdst = (u32)(ld_r * 128) + swz;

    constexpr int ACH = (BN * 8 + MG_LDT - 1) / MG_LDT;
    const u8* asrc[ACH];
    u32 asz[ACH];
#pragma unroll
    for (int i = 0; i < ACH; ++i) {
        const int n = ld_r + i * ROWS_PER_PASS;
        const int r = n < BN ? s_row[n] : -1;
        asrc[i] = r >= 0 ? act + (long long)r * kbytes + ld_c * 16 : act;
        asz[i] = r >= 0 ? 16u : 0u;
    }

#if W_FP8 == 2 && WG_WS
    // scale floats ltid and ltid + MG_LDT of each stage (BM/8 weight row groups, then BN activation rows)
    const int kblocks = Kp >> 7;
    const float* ssrc2[2];
    u32 ssz2[2];
#pragma unroll
    for (int h = 0; h < 2; ++h) {
        const int t = ltid + h * MG_LDT;
        ssrc2[h] = act_scale;
        ssz2[h] = 0;
        if (t < BM / 8) {
            ssrc2[h] = w_scale + ((long long)e * (Mp / 8) + m_base / 8 + t) * kblocks;
            ssz2[h] = 4;
        } else if (t < BM / 8 + BN) {
            const int r = s_row[t - BM / 8];
            if (r >= 0) {
                ssrc2[h] = act_scale + (long long)r * kblocks;
                ssz2[h] = 4;
            }
        }
    }
#elif W_FP8 == 2
    const int kblocks = Kp >> 7;
    const float* ssrc = act_scale;
    u32 ssz = 0;
    if (tid < BM / 8) {
        ssrc = w_scale + ((long long)e * (Mp / 8) + m_base / 8 + tid) * kblocks;
        ssz = 4;
    } else if (tid < BM / 8 + BN) {
        const int r = s_row[tid - BM / 8];
        if (r >= 0) {
            ssrc = act_scale + (long long)r * kblocks;
            ssz = 4;
        }
    }
#endif

    auto load_stage = [&](int slot, int ks) {
        const long long koff = (long long)ks * 128;
        const u32 dW = sW + slot * MG_SW_BYTES + wdst;
#pragma unroll
        for (int i = 0; i < WCH; ++i) mg_cp16(dW + i * ROWS_PER_PASS * 128, wsrc + koff + i * wpass);
        const u32 dA = sA + slot * MG_SA_BYTES + (u32)(ld_r * 128) + swz;
#pragma unroll
        for (int i = 0; i < ACH; ++i) {
            if ((BN * 8) % MG_NTHREADS == 0 || ld_r + i * ROWS_PER_PASS < BN)
                mg_cp16z(dA + i * ROWS_PER_PASS * 128, asz[i] ? asrc[i] + koff : asrc[i], asz[i]);
        }
#if W_FP8 == 2 && WG_WS
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            const int t = ltid + h * MG_LDT;
            if (t < BM / 8 + BN) mg_cp4z(sS + (slot * MG_SS_FLOATS + t) * 4, ssz2[h] ? ssrc2[h] + ks : ssrc2[h], ssz2[h]);
        }
#elif W_FP8 == 2
        if (tid < BM / 8 + BN) mg_cp4z(sS + (slot * MG_SS_FLOATS + tid) * 4, ssz ? ssrc + ks : ssrc, ssz);
#endif
    };

    // ---- warp placement
    const int warp_m = warp % WARPS_M;
    const int warp_n = (warp / WARPS_M) % WARPS_N;
    const int warp_k = warp / (WARPS_M * WARPS_N);
    const int wm0 = warp_m * MG_WTM;
    const int wn0 = warp_n * MG_WTN;
    const bool warp_active = wn0 < nrows;  // all its columns missing: skip the MMAs (loads still shared)

#if WGMMA
    // ---- warpgroup MMA main loop (see WGMMA in the header)
    const int wgrp = warp >> 2;  // warpgroup: weight rows 64 * wgrp .. + 63
    (void)warp_k;
    constexpr int NACC = MG_MT * MG_NTL * 4;  // accumulator floats per thread per set (BN / 2)
    float acc[MG_MT][MG_NTL][4];
    float* const accf = &acc[0][0][0];

#if WG_WS
    // ---- warp specialisation (WG_WS): warpgroup 2 loads, warpgroups 0 and 1 issue the wgmma (see the header)
    if (warp >= MG_NWARPS) {
        mg_setmaxnreg_dec<WG_WS_PREGS>();
        int slot_i = 0;  // slot of the step loaded next
        u32 ph_i = 0;    // parity of its use count (n = j / STAGES): wait for empty phase n - 1
        // iteration j: signal step j - LAG (its group landed), then load step j. Step j needs the release of
        // step j - STAGES, which the consumers give after issuing step j - STAGES + 1, signalled at iteration
        // j - STAGES + 1 + LAG = j - 1 (no deadlock for LAG <= STAGES - 1; the consumers hold two slots, so
        // at most STAGES - 2 can be loading anyway)
        constexpr int LAG = STAGES - 2;
        int slot_s = 0;  // slot of the step signalled next
        for (int j = 0; j < nk + LAG; ++j) {
            if (j >= LAG) {
                mg_cp_wait<LAG - 1>();  // this thread's group j - LAG has landed (j groups committed) ...
                mg_fence_proxy_async();  // ... and is visible to the async proxy ...
                __syncwarp();            // ... for the whole warp; lane 0 arrives for it
                mg_mbar_arrive_if(bar_full + 8 * slot_s, lane == 0);
                slot_s = slot_s + 1 == STAGES ? 0 : slot_s + 1;
            }
            if (j < nk) {
                if (j >= STAGES) mg_mbar_wait(bar_empty + 8 * slot_i, ph_i ^ 1u);
                load_stage(slot_i, j);
            }
            mg_cp_commit();  // (empty groups in the tail keep the group count uniform)
            slot_i = slot_i + 1 == STAGES ? 0 : slot_i + 1;
            ph_i ^= (u32)(slot_i == 0);
        }
        return;
    }
    mg_setmaxnreg_inc<MG_WS_CREGS>();
    int slot_c = 0;  // slot of the step consumed next
    u32 ph_c = 0;    // parity of its fill count
    auto full_wait = [&]() { mg_mbar_wait(bar_full + 8 * slot_c, ph_c); };
    auto advance = [&]() {
        slot_c = slot_c + 1 == STAGES ? 0 : slot_c + 1;
        ph_c ^= (u32)(slot_c == 0);
    };
#else
    // prologue: STAGES - 2 stages in flight (a slot is refilled two steps after its wgmma was issued)
#pragma unroll
    for (int s = 0; s < STAGES - 2; ++s) {
        if (s < nk) load_stage(s, s);
        mg_cp_commit();
    }

    int slot_c = 0;           // stage consumed this iteration
    int slot_l = STAGES - 2;  // stage refilled this iteration (consumed two iterations ago)
    // wait for step ks's stage, refill the slot of step ks - 2 (its wgmma are complete: every warpgroup
    // waited for them before this barrier)
    auto step_head = [&](int ks) {
        mg_cp_wait<STAGES - 3>();  // group ks has landed (for this thread) ...
        mg_fence_proxy_async();    // ... and is visible to the async proxy (wgmma) ...
        __syncthreads();           // ... for all threads; the wgmma of step ks-2 (slot_l) are complete
        if (ks + STAGES - 2 < nk) load_stage(slot_l, ks + STAGES - 2);
        mg_cp_commit();
    };
    auto advance = [&]() {
        slot_c = slot_c + 1 == STAGES ? 0 : slot_c + 1;
        slot_l = slot_l + 1 == STAGES ? 0 : slot_l + 1;
    };
#endif  // WG_WS
    // the four wgmma of one K step from stage `slot` into d; acc_in = 0: the first overwrites d
    // (scale-d = 0: promoted, every step; unpromoted, the first), 1: all add to d
    auto issue = [&](float* d, int slot, int acc_in) {
        const u32 aW = sW + slot * MG_SW_BYTES + wgrp * (64 * 128);
        const u32 aA = sA + slot * MG_SA_BYTES;
#pragma unroll
        for (int i = 0; i < NACC; ++i) mg_reg_fence(d[i]);
        mg_wg_fence();
#pragma unroll
        for (int q = 0; q < 4; ++q) mg_wgmma(d, mg_desc(aW + 32 * q), mg_desc(aA + 32 * q), acc_in | (q > 0));
        mg_wg_commit();
    };
#if MG_PROMOTE
    // promote one K step's partial p (its wgmma complete): acc += p * w_scale(row group of 8) *
    // act_scale(column), the scales of the step's stage `slot`
    auto fold = [&](float* p, int slot) {
#pragma unroll
        for (int i = 0; i < NACC; ++i) mg_reg_fence(p[i]);
        const float* sws = (const float*)(smem_al + STAGES * (MG_SW_BYTES + MG_SA_BYTES)) + slot * MG_SS_FLOATS;
        const float* sas = sws + BM / 8;
        const int t2 = (lane & 3) * 2;
        const float ws0 = sws[wm0 / 8];
        const float ws1 = sws[wm0 / 8 + 1];
#pragma unroll
        for (int j = 0; j < MG_NTL; ++j) {
            const float2 as = *(const float2*)(sas + 8 * j + t2);
            acc[0][j][0] = fmaf(p[4 * j + 0], ws0 * as.x, acc[0][j][0]);
            acc[0][j][1] = fmaf(p[4 * j + 1], ws0 * as.y, acc[0][j][1]);
            acc[0][j][2] = fmaf(p[4 * j + 2], ws1 * as.x, acc[0][j][2]);
            acc[0][j][3] = fmaf(p[4 * j + 3], ws1 * as.y, acc[0][j][3]);
        }
    };
#pragma unroll
    for (int i = 0; i < NACC; ++i) accf[i] = 0.0f;  // never written by wgmma
    float part[NACC];                                // one K step's partial
    // wait for each step's wgmma (wait_group 0) and fold before the next step is issued
    for (int ks = 0; ks < nk; ++ks) {
#if WG_WS
        full_wait();
#else
        step_head(ks);
#endif
        issue(part, slot_c, false);
        mg_wg_wait<0>();
        fold(part, slot_c);
#if WG_WS
        mg_mbar_arrive_if(bar_empty + 8 * slot_c, lane == 0);  // wgmma retired, scales read
#endif
        advance();
    }
#else
    // (acc is not initialised here; the first wgmma runs with scale-d = 0; nk == 0 -> epilogue)
#if WG_WS
    u32 rel = bar_spare;  // slot of step ks-1, released once its wgmma retired (ks = 0: the spare barrier)
    for (int ks = 0; ks < nk; ++ks) {
        full_wait();
        issue(accf, slot_c, ks != 0);
        mg_wg_wait<1>();  // the wgmma of step ks-1 are complete: release its slot
#pragma unroll
        for (int i = 0; i < NACC; ++i) mg_reg_fence(accf[i]);
        mg_mbar_arrive_if(rel, lane == 0);
        rel = bar_empty + 8 * slot_c;
        advance();
    }
#else
    for (int ks = 0; ks < nk; ++ks) {
        step_head(ks);
        issue(accf, slot_c, ks != 0);
        mg_wg_wait<1>();  // the wgmma of step ks-1 are complete: its slot may be refilled next iteration
#pragma unroll
        for (int i = 0; i < NACC; ++i) mg_reg_fence(accf[i]);
        advance();
    }
#endif
#endif
    mg_wg_wait<0>();
#pragma unroll
    for (int i = 0; i < NACC; ++i) mg_reg_fence(accf[i]);
#else
    // ldmatrix lane addressing (byte offsets inside a stage; chunk index is XORed with row & 7 = lane & 7)
    // A (x4): matrices {rows 0-7, rows 8-15} x {chunk 2kk, 2kk+1} -> a0..a3; lane l addresses row l & 15,
    //         chunk 2kk + (l >> 4).
    const u32 a_row_off = (u32)((wm0 + (lane & 15)) * 128);
    const u32 a_chi = (u32)(lane >> 4);
    // B (x4 over two n8 tiles): matrices {tile j chunk 2kk, tile j chunk 2kk+1, tile j+1 ...} -> b0,b1 of
    //         tile j then of tile j+1; lane l addresses row (l & 7) + 8 * (l >> 4), chunk 2kk + ((l >> 3) & 1).
    //   (x2, one n8 tile): lanes 0-15, row l & 7, same chunk rule.
    const u32 b_row_off = (u32)((wn0 + (lane & 7) + (MG_NTL >= 2 ? ((lane >> 4) << 3) : 0)) * 128);
    const u32 b_chi = (u32)((lane >> 3) & 1);
    const u32 lane7 = (u32)(lane & 7);

    float acc[MG_MT][MG_NTL][4];
#pragma unroll
    for (int i = 0; i < MG_MT; ++i)
#pragma unroll
        for (int j = 0; j < MG_NTL; ++j)
#pragma unroll
            for (int c = 0; c < 4; ++c) acc[i][j][c] = 0.0f;

    auto load_frags = [&](u32 aW, u32 aA, int kk, u32 (&af)[MG_MT][4], u32 (&bf)[MG_NTL][2]) {
        const u32 ca = ((2u * kk + a_chi) ^ lane7) << 4;
#pragma unroll
        for (int i = 0; i < MG_MT; ++i)
            mg_ldsm_x4(aW + a_row_off + i * 16 * 128 + ca, af[i][0], af[i][1], af[i][2], af[i][3]);
        const u32 cb = ((2u * kk + b_chi) ^ lane7) << 4;
#if MG_NTL == 1
        mg_ldsm_x2(aA + b_row_off + cb, bf[0][0], bf[0][1]);
#else
#pragma unroll
        for (int j = 0; j < MG_NTL; j += 2)
            mg_ldsm_x4(aA + b_row_off + j * 8 * 128 + cb, bf[j][0], bf[j][1], bf[j + 1][0], bf[j + 1][1]);
#endif
    };

    // ---- pipeline prologue
#pragma unroll
    for (int s = 0; s < STAGES - 1; ++s) {
        if (s < nk) load_stage(s, s);
        mg_cp_commit();
    }

    int slot_c = 0;           // stage consumed this iteration
    int slot_l = STAGES - 1;  // stage refilled this iteration (the one consumed in the previous iteration)
    for (int ks = 0; ks < nk; ++ks) {
        mg_cp_wait<STAGES - 2>();  // group ks has landed (for this thread) ...
        __syncthreads();           // ... for all threads; and everyone is done reading slot_l
        if (ks + STAGES - 1 < nk) load_stage(slot_l, ks + STAGES - 1);
        mg_cp_commit();

        if (warp_active) {
            const u32 aW = sW + slot_c * MG_SW_BYTES;
            const u32 aA = sA + slot_c * MG_SA_BYTES;
#if W_FP8 == 2
            float part[MG_MT][MG_NTL][4];
#pragma unroll
            for (int i = 0; i < MG_MT; ++i)
#pragma unroll
                for (int j = 0; j < MG_NTL; ++j)
#pragma unroll
                    for (int c = 0; c < 4; ++c) part[i][j][c] = 0.0f;
#define MG_TGT part
#else
#define MG_TGT acc
#endif
#if FRAG_DB
            // register double buffer: fragments of sub-step q+1 are loaded before the MMAs of sub-step q
            u32 af[2][MG_MT][4];
            u32 bf[2][MG_NTL][2];
            load_frags(aW, aA, warp_k, af[0], bf[0]);
#pragma unroll
            for (int q = 0; q < MG_KPW; ++q) {
                if (q + 1 < MG_KPW) load_frags(aW, aA, warp_k + (q + 1) * WARPS_K, af[(q + 1) & 1], bf[(q + 1) & 1]);
#pragma unroll
                for (int i = 0; i < MG_MT; ++i)
#pragma unroll
                    for (int j = 0; j < MG_NTL; ++j) mg_mma(MG_TGT[i][j], af[q & 1][i], bf[q & 1][j][0], bf[q & 1][j][1]);
            }
#else
#pragma unroll
            for (int q = 0; q < MG_KPW; ++q) {
                u32 af[MG_MT][4];
                u32 bf[MG_NTL][2];
                load_frags(aW, aA, warp_k + q * WARPS_K, af, bf);
#pragma unroll
                for (int i = 0; i < MG_MT; ++i)
#pragma unroll
                    for (int j = 0; j < MG_NTL; ++j) mg_mma(MG_TGT[i][j], af[i], bf[j][0], bf[j][1]);
            }
#endif
#undef MG_TGT
#if W_FP8 == 2
            // promote the 128-wide K block: acc += partial * w_scale(row block) * act_scale(column)
            const float* sws = (const float*)(smem + STAGES * (MG_SW_BYTES + MG_SA_BYTES)) + slot_c * MG_SS_FLOATS;
            const float* sas = sws + BM / 8;
            const int t2 = (lane & 3) * 2;
#pragma unroll
            for (int i = 0; i < MG_MT; ++i) {
                const float ws0 = sws[(wm0 + 16 * i) / 8];
                const float ws1 = sws[(wm0 + 16 * i) / 8 + 1];
#pragma unroll
                for (int j = 0; j < MG_NTL; ++j) {
                    const float as0 = sas[wn0 + 8 * j + t2];
                    const float as1 = sas[wn0 + 8 * j + t2 + 1];
                    acc[i][j][0] = fmaf(part[i][j][0], ws0 * as0, acc[i][j][0]);
                    acc[i][j][1] = fmaf(part[i][j][1], ws0 * as1, acc[i][j][1]);
                    acc[i][j][2] = fmaf(part[i][j][2], ws1 * as0, acc[i][j][2]);
                    acc[i][j][3] = fmaf(part[i][j][3], ws1 * as1, acc[i][j][3]);
                }
            }
#endif
        }
        slot_c = slot_c + 1 == STAGES ? 0 : slot_c + 1;
        slot_l = slot_l + 1 == STAGES ? 0 : slot_l + 1;
    }
#endif  // WGMMA

#if WARPS_K > 1
    // ---- fixed-order reduction of the k-split warps through shared memory (reuses the pipeline buffers)
    mg_cp_wait<0>();
    __syncthreads();
    {
        float* red = (float*)smem;
        constexpr int NACC = MG_MT * MG_NTL * 4;
        const int wmn = warp % (WARPS_M * WARPS_N);
        if (warp_k > 0) {
            float* dst = red + ((warp_k - 1) * (WARPS_M * WARPS_N) + wmn) * NACC * 32 + lane;
#pragma unroll
            for (int i = 0; i < MG_MT; ++i)
#pragma unroll
                for (int j = 0; j < MG_NTL; ++j)
#pragma unroll
                    for (int c = 0; c < 4; ++c) dst[((i * MG_NTL + j) * 4 + c) * 32] = acc[i][j][c];
        }
        __syncthreads();
        if (warp_k > 0) return;
#pragma unroll
        for (int kq = 1; kq < WARPS_K; ++kq) {
            const float* src = red + ((kq - 1) * (WARPS_M * WARPS_N) + wmn) * NACC * 32 + lane;
#pragma unroll
            for (int i = 0; i < MG_MT; ++i)
#pragma unroll
                for (int j = 0; j < MG_NTL; ++j)
#pragma unroll
                    for (int c = 0; c < 4; ++c) acc[i][j][c] += src[((i * MG_NTL + j) * 4 + c) * 32];
        }
    }
#endif

    // ---- epilogue: thread holds rows (g, g+8) x columns (2t, 2t+1) of every m16 x n8 tile
    if (!warp_active) return;
    const int g = lane >> 2;
    const int t2 = (lane & 3) * 2;
#if W_FP8 == 1
    const float dq = w_scale[e] * act_scale[0];
#endif
#if EPI != 0 && OUT_TYPE == 2
    const float oscale = out_scale[0];
#else
    const float oscale = 1.0f;
#endif
    const float* bias_e = bias != nullptr ? bias + (long long)e * Mp + m_base : nullptr;
    const bool has_rw = row_weight != nullptr;

#pragma unroll
    for (int i = 0; i < MG_MT; ++i) {
        const int rl = wm0 + 16 * i + g;  // local rows rl (h = 0) and rl + 8 (h = 1)
        const float b0 = bias_e != nullptr ? bias_e[rl] : 0.0f;
        const float b1 = bias_e != nullptr ? bias_e[rl + 8] : 0.0f;
#pragma unroll
        for (int j = 0; j < MG_NTL; ++j) {
#pragma unroll
            for (int c = 0; c < 2; ++c) {
                const int n = wn0 + 8 * j + t2 + c;
                if (n < nrows) {
#if WGMMA && !MG_PROMOTE
                    float v0 = nk > 0 ? acc[i][j][c] : 0.0f;  // (never written by a wgmma when nk == 0)
                    float v1 = nk > 0 ? acc[i][j][2 + c] : 0.0f;
#else
                    float v0 = acc[i][j][c];
                    float v1 = acc[i][j][2 + c];
#endif
#if W_FP8 == 1
                    v0 *= dq;
                    v1 *= dq;
#endif
                    if (has_rw) {
                        const float rw = s_rw[n];
                        v0 *= rw;
                        v1 *= rw;
                    }
                    v0 += b0;
                    v1 += b1;
                    const long long orow = (long long)(row0 + n) * out_stride;
#if EPI == 0
                    mg_store(out, orow + m_base + rl, v0, oscale);
                    mg_store(out, orow + m_base + rl + 8, v1, oscale);
#elif EPI == 1
                    const int jf = ((m_base + wm0 + 16 * i) >> 1) + g;
                    mg_store(out, orow + jf, mg_act(v0, v1, act_alpha, act_beta, act_limit), oscale);
#else
                    const float r0 = fmaxf(v0, 0.0f);
                    const float r1 = fmaxf(v1, 0.0f);
                    mg_store(out, orow + m_base + rl, r0 * r0, oscale);
                    mg_store(out, orow + m_base + rl + 8, r1 * r1, oscale);
#endif
                }
            }
        }
    }
    (void)oscale;
}
