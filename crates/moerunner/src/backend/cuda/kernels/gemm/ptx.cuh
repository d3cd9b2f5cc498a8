// PTX wrappers of the GEMM pieces: shared-memory addresses, cp.async, ldmatrix, mma.sync, the async-proxy
// fence, mbarriers, setmaxnreg. Each is one instruction (or a short fixed sequence); none depends on the
// kernel's configuration. The tensor-core operand types are tags: both fill 32 bytes of K per k-sub-step
// (m16n8k16 bf16, m16n8k32 e4m3; the same 32-bit-word fragment layout), so the byte-level tiling is shared.
#pragma once

struct Bf16 {
    enum : int { BYTES = 2 };
};
struct E4m3 {
    enum : int { BYTES = 1 };
};

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

// Bulk prefetch of `bytes` at `p` into L2 (no shared memory, no completion to wait for).
__device__ __forceinline__ void mg_prefetch_l2(const void* p, u32 bytes) {
    asm volatile("cp.async.bulk.prefetch.L2.global [%0], %1;" ::"l"(p), "r"(bytes) : "memory");
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

// D = A * B + D, A 16 x (32 bytes of K) row-major, B (32 bytes of K) x 8 column-major, f32 accumulators.
template <class T>
__device__ __forceinline__ void mg_mma(float* c, const u32* a, u32 b0, u32 b1);

template <>
__device__ __forceinline__ void mg_mma<Bf16>(float* c, const u32* a, u32 b0, u32 b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

template <>
__device__ __forceinline__ void mg_mma<E4m3>(float* c, const u32* a, u32 b0, u32 b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k32.row.col.f32.e4m3.e4m3.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// cp.async writes are generic-proxy writes; wgmma reads shared memory through the async proxy.
__device__ __forceinline__ void mg_fence_proxy_async() { asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory"); }

// mbarriers (shared::cta): init with an expected arrival count, arrive (release.cta), wait for the phase of a
// parity to complete (acquire.cta); predicated arrive keeps the consumer loop straight-line (no branch)
__device__ __forceinline__ void mg_mbar_init(u32 bar, u32 count) {
    asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;" ::"r"(bar), "r"(count) : "memory");
}
// makes the initialised barriers visible to the other threads (and the async proxy)
__device__ __forceinline__ void mg_mbar_init_fence() { asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory"); }
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

// keeps the compiler from moving accumulator accesses across the wgmma fence / wait points
__device__ __forceinline__ void mg_reg_fence(float& x) { asm volatile("" : "+f"(x)::"memory"); }
// the same for a register-sourced wgmma's A fragment: it must stay live (unmodified) until the wgmma retired
__device__ __forceinline__ void mg_reg_fence_u(u32& x) { asm volatile("" : "+r"(x)::"memory"); }
