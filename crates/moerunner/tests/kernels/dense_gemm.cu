// A dense (non-MoE) bf16 GEMM built from the GEMM's pieces (config, ptx, the bf16 format, the stage loads, the
// mma.sync main loop, the epilogue), compiled (not run) by tests/cuda.rs to prove that they compose without the
// MoE plumbing: no tile list, no sorted pairs, no expert. out[n][m] = sum_k w[m][k] * x[n][k] (+ bias[m]) in f32
// (a Linear layer: weights on the M side, tokens on the N side, as moe_gemm). Also instantiates every wgmma
// wrapper, the register-sourced (RS) ones included, which the MoE kernel does not use yet.
#define EPILOGUE EPI_DOWN
#define STORE STORE_F32
#include "gemm/config.cuh"
#include "gemm/ptx.cuh"
#include "gemm/wgmma.cuh"
#include "gemm/scale_bf16.cuh"
#include "gemm/epilogue.cuh"

using Fmt = WeightFormat<WFMT_BF16>::type;

// w [M, Kp] bf16, x [N, Kp] bf16, out [N, M] f32, bias [M] or null; M % BM == 0, Kp % 64 == 0. Block MG_NTHREADS,
// grid (M / BM, ceil(N / BN)), MG_SMEM_BYTES of dynamic shared memory. The tile's rows of x are rows n0.., the
// rows past N zero-filled: the loads' gather with the identity as its row list.
extern "C" __global__ void __launch_bounds__(MG_NTHREADS, 1)
    dense_gemm(const u8* __restrict__ w, const u8* __restrict__ x, float* __restrict__ out,
               const float* __restrict__ bias, int M, int N, int Kp) {
    constexpr int ESZ = Fmt::Elem::BYTES;
    const u8* act = x;
    const float* w_scale = nullptr;  // (bf16: no scales)
    const float* act_scale = nullptr;
    const int e = 0;  // one weight matrix
    const int Mp = M;
    const int m_base = blockIdx.x * BM;
    const int row0 = blockIdx.y * BN;
    const int nrows = min(N - row0, BN);
    __shared__ int s_row[BN];
    extern __shared__ __align__(128) u8 smem[];
    const int tid = threadIdx.x;
    const int lane = tid & 31;
    const int warp = tid >> 5;
    const int ltid = tid;
    if (tid < BN) s_row[tid] = tid < nrows ? row0 + tid : -1;
    __syncthreads();

#include "gemm/loads.cuh"

    const int warp_k = warp / (WARPS_M * WARPS_N);
    const int wm0 = (warp % WARPS_M) * MG_WTM;
    const int wn0 = ((warp / WARPS_M) % WARPS_N) * MG_WTN;
    const bool warp_active = wn0 < nrows;

#include "gemm/mainloop_mma.cuh"

    if (!warp_active) return;
    const EpilogueArgs ea{e, w_scale, act_scale, bias, nullptr, out, Mp, m_base, row0, M, 0.0f, 0.0f, 0.0f};
    mg_epilogue<Fmt>(acc, true, ea, nullptr, false, nrows, lane, wm0, wn0);
}

// One warpgroup: every generated wgmma shape in both forms (SS and RS) and both types, from a 1024-byte
// aligned shared tile; the accumulators are stored so nothing is optimised away.
template <int N, class T>
__device__ __forceinline__ void wgmma_both(float* out, u32 tile, const u32 (&a)[4]) {
    float d[N / 2];
#pragma unroll
    for (int i = 0; i < N / 2; ++i) d[i] = 0.0f;
    mg_wg_fence();
    mg_wgmma<N, T>(d, mg_desc(tile), mg_desc(tile + 32), 0);
    mg_wgmma_rs<N, T>(d, a, mg_desc(tile + 64), 1);
    mg_wg_commit();
    mg_wg_wait<0>();
#pragma unroll
    for (int i = 0; i < N / 2; ++i) out[i * 128 + threadIdx.x] += d[i];
}

extern "C" __global__ void __launch_bounds__(128, 1) wgmma_forms(const u32* __restrict__ a_regs, float* __restrict__ out) {
    __shared__ __align__(1024) u8 tile[256 * 128];
    const u32 s = mg_smem_addr(tile);
    const u32 a[4] = {a_regs[threadIdx.x], a_regs[threadIdx.x + 128], a_regs[threadIdx.x + 256], a_regs[threadIdx.x + 384]};
    wgmma_both<8, Bf16>(out, s, a);
    wgmma_both<16, Bf16>(out, s, a);
    wgmma_both<32, Bf16>(out, s, a);
    wgmma_both<64, Bf16>(out, s, a);
    wgmma_both<128, Bf16>(out, s, a);
    wgmma_both<256, Bf16>(out, s, a);
    wgmma_both<8, E4m3>(out, s, a);
    wgmma_both<16, E4m3>(out, s, a);
    wgmma_both<32, E4m3>(out, s, a);
    wgmma_both<64, E4m3>(out, s, a);
    wgmma_both<128, E4m3>(out, s, a);
    wgmma_both<256, E4m3>(out, s, a);
}
