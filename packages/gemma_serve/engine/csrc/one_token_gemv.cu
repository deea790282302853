// y[n] = scale[n] * sum_k W[n, k] x[k] for one token: INT8 weights [N, K] (one float32 scale per
// row), x bf16 [K], y float32 or bf16 [N]; or, for a gate_up matrix, gelu_tanh(gate) * up.
// Experimental: measured by bench/tma_gemv_probe.py, used by the engine only with GEMMA_CUDA_GEMV=1.
//
// Why: the sixteenth run's megakernel streamed weights through per-warp shared-memory rings filled
// by bulk copies at 98% of the copy rate, while the engine's Triton one-token INT8 kernel reads qkv
// and o at 56% and 45% of theirs. Here each warp owns contiguous rows and streams them the same
// way. Its first NSLOT chunks are asked for BEFORE the programmatic-dependent-launch wait: weights
// are never written, and bulk copies land in shared memory, not registers. The Triton kernel could
// only read one early tile a program without losing occupancy. For qkv (10.5 MB, ~5 KB a warp)
// that is the whole slice.
//
// Launched with programmatic stream serialization (PDL) so that it can start while the kernel
// before it drains; it lets the next kernel be scheduled once its own wait returns.

#include <cuda_runtime.h>
#include <cuda_bf16.h>
#include <stdint.h>

#include "bulk_copy.cuh"

#ifndef NWARPS
#define NWARPS 8
#endif
#ifndef NSLOT
#define NSLOT 2
#endif
#ifndef CH_BYTES
#define CH_BYTES 4096  // a 2560-wide INT8 row is one chunk, a 10240-wide row three (4096, 4096, 2048)
#endif
#define NTHREADS (NWARPS * 32)

// Byte k of w (a signed INT8) as a float: 2^23 + (byte ^ 0x80) placed in a float's mantissa, minus
// 2^23 + 128. One byte permute and one add, no int-to-float conversion unit.
__device__ __forceinline__ float i8_at(uint32_t flipped, int k) {
    return __uint_as_float(__byte_perm(flipped, 0x4B000000u, 0x7540 + k)) - 8388736.0f;
}

// This warp's chunk number `idx` of its rows [r0, r1): the source and byte count. With GELU a "row"
// is a gate/up pair: the gate row's chunks, then the up row's (row n_out + r).
template <bool GELU>
__device__ __forceinline__ const int8_t* chunk_at(const int8_t* W, int K, int n_out, int r0, int idx, int per_row,
                                                  uint32_t& bytes) {
    const int per_unit = GELU ? 2 * per_row : per_row;
    const int unit = r0 + idx / per_unit, within = idx % per_unit;
    const int row = GELU && within >= per_row ? n_out + unit : unit;
    const int first = (within % per_row) * CH_BYTES;
    bytes = (uint32_t)(K - first < CH_BYTES ? K - first : CH_BYTES);
    return W + (size_t)row * K + first;
}

__device__ __forceinline__ float gelu_tanh(float x) {
    return 0.5f * x * (1.f + tanhf(0.7978845608028654f * (x + 0.044715f * x * x * x)));
}

// GELU: W is a gate_up matrix [2 n_out, K]; y[r] = gelu_tanh(gate_r) * up_r. y is float32, or bf16
// with out_bf16 (rounded once).
template <bool GELU>
__global__ void __launch_bounds__(NTHREADS) one_token_gemv_int8(const int8_t* __restrict__ W,
                                                                const float* __restrict__ scale,
                                                                const __nv_bfloat16* __restrict__ x,
                                                                void* __restrict__ y, int n_out, int K, int out_bf16) {
    extern __shared__ __align__(128) unsigned char smem[];
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    unsigned char* ring = smem + warp * NSLOT * CH_BYTES;
    uint64_t* bars = reinterpret_cast<uint64_t*>(smem + NWARPS * NSLOT * CH_BYTES) + warp * NSLOT;
    __nv_bfloat16* xs = reinterpret_cast<__nv_bfloat16*>(smem + NWARPS * NSLOT * CH_BYTES + NWARPS * NSLOT * 8);

    const long long gw = (long long)blockIdx.x * NWARPS + warp, nw = (long long)gridDim.x * NWARPS;
    const int r0 = (int)(n_out * gw / nw), r1 = (int)(n_out * (gw + 1) / nw);
    const int per_row = (K + CH_BYTES - 1) / CH_BYTES;
    const int total = (r1 - r0) * per_row * (GELU ? 2 : 1);

    // Before the wait: the ring's first chunks (weights: no kernel writes them).
    if (lane == 0) {
        for (int s = 0; s < NSLOT; ++s) mbar_init(bars + s, 1);
        asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
        for (int s = 0; s < NSLOT && s < total; ++s) {
            uint32_t bytes;
            const int8_t* src = chunk_at<GELU>(W, K, n_out, r0, s, per_row, bytes);
            bulk_load(ring + s * CH_BYTES, src, bytes, bars + s);
        }
    }
    __syncwarp();
    asm volatile("griddepcontrol.wait;" ::: "memory");
    asm volatile("griddepcontrol.launch_dependents;" :::);
    // x: up to 8 of a thread's loads issued before any store (one L2 round trip per 8 x NTHREADS
    // vectors of 8, not one per vector; one round for K up to 16384 at 8 warps).
#pragma unroll 1
    for (int base = 0; base < K / 8; base += 8 * NTHREADS) {
        uint4 u[8];
#pragma unroll
        for (int i = 0; i < 8; ++i) {
            const int v = base + threadIdx.x + i * NTHREADS;
            if (v < K / 8) u[i] = reinterpret_cast<const uint4*>(x)[v];
        }
#pragma unroll
        for (int i = 0; i < 8; ++i) {
            const int v = base + threadIdx.x + i * NTHREADS;
            if (v < K / 8) reinterpret_cast<uint4*>(xs)[v] = u[i];
        }
    }
    __syncthreads();

    float acc0 = 0.f, acc1 = 0.f, gate = 0.f;
    for (int idx = 0; idx < total; ++idx) {
        const int slot = idx % NSLOT, c = idx % per_row;
        mbar_wait(bars + slot, (uint32_t)((idx / NSLOT) & 1));
        const int first = c * CH_BYTES;
        const int n = K - first < CH_BYTES ? K - first : CH_BYTES;
        const uint2* w2 = reinterpret_cast<const uint2*>(ring + slot * CH_BYTES);  // 8 weights a lane a step
        const uint4* x4 = reinterpret_cast<const uint4*>(xs + first);              // their 8 inputs
#pragma unroll 4
        for (int v = lane; v < n / 8; v += 32) {
            const uint2 w = w2[v];
            const uint4 xv = x4[v];
            const uint32_t a = w.x ^ 0x80808080u, b = w.y ^ 0x80808080u;
            acc0 = fmaf(i8_at(a, 0), bf_lo(xv.x), acc0);
            acc1 = fmaf(i8_at(a, 1), bf_hi(xv.x), acc1);
            acc0 = fmaf(i8_at(a, 2), bf_lo(xv.y), acc0);
            acc1 = fmaf(i8_at(a, 3), bf_hi(xv.y), acc1);
            acc0 = fmaf(i8_at(b, 0), bf_lo(xv.z), acc0);
            acc1 = fmaf(i8_at(b, 1), bf_hi(xv.z), acc1);
            acc0 = fmaf(i8_at(b, 2), bf_lo(xv.w), acc0);
            acc1 = fmaf(i8_at(b, 3), bf_hi(xv.w), acc1);
        }
        __syncwarp();
        if (lane == 0 && idx + NSLOT < total) {  // refill the slot just read
            uint32_t bytes;
            const int8_t* src = chunk_at<GELU>(W, K, n_out, r0, idx + NSLOT, per_row, bytes);
            asm volatile("fence.proxy.async.shared::cta;" ::: "memory");
            bulk_load(ring + slot * CH_BYTES, src, bytes, bars + slot);
        }
        if (c == per_row - 1) {  // a row's last chunk: reduce and scale
            const float s = warp_sum(acc0 + acc1);
            acc0 = 0.f;
            acc1 = 0.f;
            const int per_unit = GELU ? 2 * per_row : per_row;
            const int unit = r0 + idx / per_unit;
            const bool up_row = GELU && (idx % per_unit) >= per_row;
            const float v = s * scale[up_row ? n_out + unit : unit];
            if (GELU && !up_row) {
                gate = v;  // wait for the up row
                continue;
            }
            const float out = GELU ? gelu_tanh(gate) * v : v;
            if (lane == 0) {
                if (out_bf16)
                    reinterpret_cast<__nv_bfloat16*>(y)[unit] = __float2bfloat16(out);
                else
                    reinterpret_cast<float*>(y)[unit] = out;
            }
        }
    }
}

extern "C" {

size_t one_token_gemv_smem_bytes(int K) { return (size_t)NWARPS * NSLOT * (CH_BYTES + 8) + (size_t)K * 2; }

// One launch on `stream` with `blocks` blocks: y [n_out] from W [n_out, K] (gelu: W [2 n_out, K],
// y = gelu_tanh(gate) * up); out_bf16: y is bf16, else float32; pdl: programmatic stream
// serialization. Returns a cudaError_t as int. K must be a multiple of 16 and W, x 16-byte aligned.
int one_token_gemv_int8_launch(const void* W, const float* scale, const void* x, void* y, int n_out, int K, int gelu,
                               int out_bf16, int blocks, int pdl, cudaStream_t stream) {
    const size_t smem = one_token_gemv_smem_bytes(K);
    // Raise the shared-memory limit only when it grows: the warm-up calls before a CUDA graph capture
    // set it, so nothing but launches happens while a graph is being captured.
    static size_t configured[2] = {0, 0};
    if (smem > configured[gelu ? 1 : 0]) {
        const void* fn = gelu ? (const void*)one_token_gemv_int8<true> : (const void*)one_token_gemv_int8<false>;
        cudaError_t err = cudaFuncSetAttribute(fn, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem);
        if (err != cudaSuccess) return (int)err;
        configured[gelu ? 1 : 0] = smem;
    }
    cudaLaunchConfig_t cfg = {};
    cfg.gridDim = dim3(blocks);
    cfg.blockDim = dim3(NTHREADS);
    cfg.dynamicSmemBytes = smem;
    cfg.stream = stream;
    cudaLaunchAttribute attr[1];
    attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
    attr[0].val.programmaticStreamSerializationAllowed = pdl ? 1 : 0;
    cfg.attrs = attr;
    cfg.numAttrs = 1;
    const int8_t* w = (const int8_t*)W;
    const __nv_bfloat16* xb = (const __nv_bfloat16*)x;
    if (gelu) return (int)cudaLaunchKernelEx(&cfg, one_token_gemv_int8<true>, w, scale, xb, y, n_out, K, out_bf16);
    return (int)cudaLaunchKernelEx(&cfg, one_token_gemv_int8<false>, w, scale, xb, y, n_out, K, out_bf16);
}

}  // extern "C"
