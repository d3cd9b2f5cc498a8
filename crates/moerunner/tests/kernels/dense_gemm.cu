// A dense (non-MoE) bf16 GEMM built from the GEMM's pieces, compiled (not run) by tests/cuda.rs to prove that
// the pieces compose without the MoE plumbing: no tile list, no gather, no expert. out[n][m] = sum_k w[m][k] *
// x[n][k] (+ bias[m]) in f32 (a Linear layer: weights on the M side, tokens on the N side, as moe_gemm). Also
// instantiates the wgmma wrappers the MoE kernel does not use yet, the register-sourced (RS) ones included.
#define EPILOGUE EPI_DOWN
#define STORE STORE_F32
#include "gemm/config.cuh"
#include "gemm/ptx.cuh"
#include "gemm/wgmma.cuh"
#include "gemm/scale_bf16.cuh"
#include "gemm/epilogue.cuh"

using Fmt = WeightFormat<WFMT_BF16>::type;
static_assert(WARPS_K == 1, "this simple kernel has no k-split reduction");

// w [M, K] bf16, x [N, K] bf16, out [N, M] f32, bias [M] or null; M % BM == 0, K % 16 == 0. Fragments come
// straight from global memory (the m16n8k16 layouts), which is enough for a compile check.
extern "C" __global__ void __launch_bounds__(MG_NTHREADS, 1)
    dense_gemm(const u16* __restrict__ w, const u16* __restrict__ x, float* __restrict__ out,
               const float* __restrict__ bias, int M, int N, int K) {
    const int lane = threadIdx.x & 31;
    const int warp = threadIdx.x >> 5;
    const int g = lane >> 2, t = lane & 3;
    const int wm0 = (warp % WARPS_M) * MG_WTM;
    const int wn0 = ((warp / WARPS_M) % WARPS_N) * MG_WTN;
    const int m_base = blockIdx.x * BM;
    const int n_base = blockIdx.y * BN;
    const int nrows = min(N - n_base, BN);
    float acc[MG_MT][MG_NTL][4];
#pragma unroll
    for (int i = 0; i < MG_MT; ++i)
#pragma unroll
        for (int j = 0; j < MG_NTL; ++j)
#pragma unroll
            for (int c = 0; c < 4; ++c) acc[i][j][c] = 0.0f;
    for (int k0 = 0; k0 < K; k0 += 16) {
        u32 af[MG_MT][4];
        u32 bf[MG_NTL][2];
#pragma unroll
        for (int i = 0; i < MG_MT; ++i) {
            const u16* r0 = w + (long long)(m_base + wm0 + 16 * i + g) * K + k0 + 2 * t;
            const u16* r8 = r0 + 8ll * K;
            af[i][0] = *(const u32*)r0;
            af[i][1] = *(const u32*)r8;
            af[i][2] = *(const u32*)(r0 + 8);
            af[i][3] = *(const u32*)(r8 + 8);
        }
#pragma unroll
        for (int j = 0; j < MG_NTL; ++j) {
            const int n = n_base + wn0 + 8 * j + g;
            const u16* r = x + (long long)n * K + k0 + 2 * t;
            bf[j][0] = n < N ? *(const u32*)r : 0u;
            bf[j][1] = n < N ? *(const u32*)(r + 8) : 0u;
        }
#pragma unroll
        for (int i = 0; i < MG_MT; ++i)
#pragma unroll
            for (int j = 0; j < MG_NTL; ++j) mg_mma<Fmt::Elem>(acc[i][j], af[i], bf[j][0], bf[j][1]);
    }
    const EpilogueArgs ea{0, nullptr, nullptr, bias, nullptr, out, M, m_base, n_base, M, 0.0f, 0.0f, 0.0f};
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
