// Hopper warpgroup MMA (wgmma, sm_90a): the shared-memory matrix descriptor, the fence / commit / wait of
// the async groups, and `wgmma.mma_async` m64nNk{16 bf16, 32 e4m3} with f32 accumulators for every N of
// MG_WGMMA_SHAPES, each in two forms generated from one template below:
//   mg_wgmma<N, T>(d, desc_a, desc_b, scale_d)      SS: A (64 x K-step, weights) and B from shared memory
//   mg_wgmma_rs<N, T>(d, a[4], desc_b, scale_d)     RS: A from registers (the m16n8 A fragment layout of each
//                                                   warp's 16 rows), for weights decoded in registers
// D(64 x N) (+)= A * B; scale_d = 0: D = A * B (the accumulator is not read). Both operands K-major; the
// descriptors describe 128-byte-swizzled tiles (gemm/loads.cuh writes them so).
//
// NOTE: inline PTX names its operands by number only (NVRTC rejects symbolic %[name] operands), so the
// template is a macro over the operand numbers: N/2 accumulators %0.. come first (outputs), then the inputs.
#pragma once

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

template <int N, class T>
__device__ __forceinline__ void mg_wgmma(float* d, u64 da, u64 db, int scale_d);
template <int N, class T>
__device__ __forceinline__ void mg_wgmma_rs(float* d, const u32* a, u64 db, int scale_d);

// ---- operand lists: "%0, %1, ..." for the asm text and "+f"(d[0]), ... for the constraints, by count
#define MG_Q0 "%0, %1, %2, %3"
#define MG_Q1 "%4, %5, %6, %7"
#define MG_Q2 "%8, %9, %10, %11"
#define MG_Q3 "%12, %13, %14, %15"
#define MG_Q4 "%16, %17, %18, %19"
#define MG_Q5 "%20, %21, %22, %23"
#define MG_Q6 "%24, %25, %26, %27"
#define MG_Q7 "%28, %29, %30, %31"
#define MG_Q8 "%32, %33, %34, %35"
#define MG_Q9 "%36, %37, %38, %39"
#define MG_Q10 "%40, %41, %42, %43"
#define MG_Q11 "%44, %45, %46, %47"
#define MG_Q12 "%48, %49, %50, %51"
#define MG_Q13 "%52, %53, %54, %55"
#define MG_Q14 "%56, %57, %58, %59"
#define MG_Q15 "%60, %61, %62, %63"
#define MG_Q16 "%64, %65, %66, %67"
#define MG_Q17 "%68, %69, %70, %71"
#define MG_Q18 "%72, %73, %74, %75"
#define MG_Q19 "%76, %77, %78, %79"
#define MG_Q20 "%80, %81, %82, %83"
#define MG_Q21 "%84, %85, %86, %87"
#define MG_Q22 "%88, %89, %90, %91"
#define MG_Q23 "%92, %93, %94, %95"
#define MG_Q24 "%96, %97, %98, %99"
#define MG_Q25 "%100, %101, %102, %103"
#define MG_Q26 "%104, %105, %106, %107"
#define MG_Q27 "%108, %109, %110, %111"
#define MG_Q28 "%112, %113, %114, %115"
#define MG_Q29 "%116, %117, %118, %119"
#define MG_Q30 "%120, %121, %122, %123"
#define MG_Q31 "%124, %125, %126, %127"
#define MG_ACC_4 MG_Q0
#define MG_ACC_8 MG_ACC_4 ", " MG_Q1
#define MG_ACC_16 MG_ACC_8 ", " MG_Q2 ", " MG_Q3
#define MG_ACC_32 MG_ACC_16 ", " MG_Q4 ", " MG_Q5 ", " MG_Q6 ", " MG_Q7
#define MG_ACC_64 MG_ACC_32 ", " MG_Q8 ", " MG_Q9 ", " MG_Q10 ", " MG_Q11 ", " MG_Q12 ", " MG_Q13 ", " MG_Q14 ", " MG_Q15
#define MG_ACC_128 MG_ACC_64 ", " MG_Q16 ", " MG_Q17 ", " MG_Q18 ", " MG_Q19 ", " MG_Q20 ", " MG_Q21 ", " MG_Q22 ", " MG_Q23 ", " MG_Q24 ", " MG_Q25 ", " MG_Q26 ", " MG_Q27 ", " MG_Q28 ", " MG_Q29 ", " MG_Q30 ", " MG_Q31
#define MG_D4(i) "+f"(d[i]), "+f"(d[i + 1]), "+f"(d[i + 2]), "+f"(d[i + 3])
#define MG_CONS_4 MG_D4(0)
#define MG_CONS_8 MG_CONS_4, MG_D4(4)
#define MG_CONS_16 MG_CONS_8, MG_D4(8), MG_D4(12)
#define MG_CONS_32 MG_CONS_16, MG_D4(16), MG_D4(20), MG_D4(24), MG_D4(28)
#define MG_CONS_64 MG_CONS_32, MG_D4(32), MG_D4(36), MG_D4(40), MG_D4(44), MG_D4(48), MG_D4(52), MG_D4(56), MG_D4(60)
#define MG_CONS_128 MG_CONS_64, MG_D4(64), MG_D4(68), MG_D4(72), MG_D4(76), MG_D4(80), MG_D4(84), MG_D4(88), MG_D4(92), MG_D4(96), MG_D4(100), MG_D4(104), MG_D4(108), MG_D4(112), MG_D4(116), MG_D4(120), MG_D4(124)

// ---- the template: shape N with R = N/2 accumulators; the literal operand numbers R..R+5 follow them
// (SS: desc A, desc B, scale-d; RS: a0..a3, desc B, scale-d). T: the tag (Bf16, E4m3), TY its PTX type, K
// the instruction's k, TR the transpose immediates (bf16 only: SS tnspA tnspB, RS tnspB; K-major = 0).
#define MG_WGMMA_DEF(N, R, R1, R2, R3, R4, R5, T, TY, K, TR_SS, TR_RS)                                          \
    static_assert(2 * R == N && R1 == R + 1 && R2 == R + 2 && R3 == R + 3 && R4 == R + 4 && R5 == R + 5,       \
                  "wgmma operand numbers");                                                                     \
    template <>                                                                                                 \
    __device__ __forceinline__ void mg_wgmma<N, T>(float* d, u64 da, u64 db, int scale_d) {                    \
        asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %" #R2 ", 0;\n"                                          \
                     "wgmma.mma_async.sync.aligned.m64n" #N "k" #K ".f32." #TY "." #TY " "                      \
                     "{" MG_ACC_##R "}, "                                                                       \
                     "%" #R ", %" #R1 ", p, 1, 1" TR_SS ";\n}\n"                                                \
                     : MG_CONS_##R                                                                              \
                     : "l"(da), "l"(db), "r"(scale_d));                                                         \
    }                                                                                                           \
    template <>                                                                                                 \
    __device__ __forceinline__ void mg_wgmma_rs<N, T>(float* d, const u32* a, u64 db, int scale_d) {           \
        asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %" #R5 ", 0;\n"                                          \
                     "wgmma.mma_async.sync.aligned.m64n" #N "k" #K ".f32." #TY "." #TY " "                      \
                     "{" MG_ACC_##R "}, "                                                                       \
                     "{%" #R ", %" #R1 ", %" #R2 ", %" #R3 "}, %" #R4 ", p, 1, 1" TR_RS ";\n}\n"                \
                     : MG_CONS_##R                                                                              \
                     : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(db), "r"(scale_d));                      \
    }

// N, R = N/2, R+1 .. R+5
#define MG_WGMMA_SHAPES(X) \
    X(8, 4, 5, 6, 7, 8, 9) \
    X(16, 8, 9, 10, 11, 12, 13) \
    X(32, 16, 17, 18, 19, 20, 21) \
    X(64, 32, 33, 34, 35, 36, 37) \
    X(128, 64, 65, 66, 67, 68, 69) \
    X(256, 128, 129, 130, 131, 132, 133)

#define MG_WGMMA_BF16(N, R, R1, R2, R3, R4, R5) MG_WGMMA_DEF(N, R, R1, R2, R3, R4, R5, Bf16, bf16, 16, ", 0, 0", ", 0")
#define MG_WGMMA_E4M3(N, R, R1, R2, R3, R4, R5) MG_WGMMA_DEF(N, R, R1, R2, R3, R4, R5, E4m3, e4m3, 32, "", "")
MG_WGMMA_SHAPES(MG_WGMMA_BF16)
MG_WGMMA_SHAPES(MG_WGMMA_E4M3)
