// Shared by the experimental kernels in this folder: shared-memory addresses, mbarriers, 1-D bulk
// copies (cp.async.bulk, sm_90+) into shared memory, bf16 halves of a 32-bit word, a warp's sum,
// eight bf16 products.
#pragma once

#include <cuda_bf16.h>
#include <stdint.h>

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}
__device__ __forceinline__ float bf_lo(uint32_t u) { return __uint_as_float(u << 16); }
__device__ __forceinline__ float bf_hi(uint32_t u) { return __uint_as_float(u & 0xffff0000u); }
// acc0 / acc1 + eight bf16 weights (w) times their eight bf16 inputs (x), even and odd elements apart.
__device__ __forceinline__ void dot8_bf16(const uint4& w, const uint4& x, float& acc0, float& acc1) {
    acc0 = fmaf(bf_lo(w.x), bf_lo(x.x), acc0);
    acc1 = fmaf(bf_hi(w.x), bf_hi(x.x), acc1);
    acc0 = fmaf(bf_lo(w.y), bf_lo(x.y), acc0);
    acc1 = fmaf(bf_hi(w.y), bf_hi(x.y), acc1);
    acc0 = fmaf(bf_lo(w.z), bf_lo(x.z), acc0);
    acc1 = fmaf(bf_hi(w.z), bf_hi(x.z), acc1);
    acc0 = fmaf(bf_lo(w.w), bf_lo(x.w), acc0);
    acc1 = fmaf(bf_hi(w.w), bf_hi(x.w), acc1);
}
__device__ __forceinline__ uint32_t smem_addr(const void* p) { return (uint32_t)__cvta_generic_to_shared(p); }

__device__ __forceinline__ void mbar_init(uint64_t* bar, uint32_t count) {
    asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;" ::"r"(smem_addr(bar)), "r"(count) : "memory");
}
__device__ __forceinline__ void mbar_wait(uint64_t* bar, uint32_t parity) {
    uint32_t done;
    do {
        asm volatile(
            "{\n\t.reg .pred p;\n\t"
            "mbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\n\t"
            "selp.u32 %0, 1, 0, p;\n\t}"
            : "=r"(done)
            : "r"(smem_addr(bar)), "r"(parity)
            : "memory");
    } while (!done);
}
// A bulk copy global -> this block's shared memory, counted on `bar`.
__device__ __forceinline__ void bulk_load(void* dst, const void* src, uint32_t bytes, uint64_t* bar) {
    asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(smem_addr(bar)), "r"(bytes) : "memory");
    asm volatile(
        "cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];" ::"r"(smem_addr(dst)),
        "l"(src), "r"(bytes), "r"(smem_addr(bar))
        : "memory");
}
