// y[n] = scale[n] * sum_k W[n, k] x[k] for one token: INT8 weights [N, K] (one float32 scale per
// row) or bf16 weights, x bf16 [K], y float32 or bf16 [N]; or, for a gate_up matrix,
// gelu_tanh(gate) * up. Experimental: measured by bench/tma_gemv_probe.py, used by the engine only
// with GEMMA_CUDA_GEMV=1.
//
// Why: the sixteenth run's megakernel streamed weights through per-warp shared-memory rings filled
// by bulk copies at 98% of the copy rate, while the engine's Triton one-token INT8 kernel reads qkv
// and o at 56% and 45% of theirs. Here each warp owns contiguous rows and streams them the same
// way. Its first NSLOT chunks are asked for BEFORE the programmatic-dependent-launch wait: weights
// are never written, and bulk copies land in shared memory, not registers. The Triton kernel could
// only read one early tile a program without losing occupancy.
//
// Measured in the seventeenth run (H200, bench/tma_gemv_probe.py, docs/benchmarks.md): slower than
// the Triton kernel on every shape. Gemma 3 4B's 34 layers of INT8 projections: 1.29 ms exact, 1.26
// with float16-pair products (MATH 1), 0.95 with no products at all (MATH 2), against Triton's 1.00;
// bf16 1.76 against 1.61. A kernel per projection loses ~1.5 us to its ramp and tail even streaming
// alone, and the rings need ~160 KB an SM in flight: shapes small enough for the next kernel's block
// to sit beside this one's stream at 63-68%, not 78%. Chunks hold as many whole rows as fit (the
// first version's one-row chunks left half a 4 KB slot empty; 1-3% of the time).
//
// Launched with programmatic stream serialization (PDL) so that it can start while the kernel
// before it drains; it lets the next kernel be scheduled once its own wait returns.

#include <cuda_runtime.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

#include "bulk_copy.cuh"

#ifndef NWARPS
#define NWARPS 8
#endif
#ifndef NSLOT
#define NSLOT 2
#endif
#ifndef CH_BYTES
#define CH_BYTES 5120  // two 2560-wide INT8 rows, one bf16 row; a 10240-wide INT8 row in two parts
#endif
#ifndef MATH
#define MATH 0  // INT8 products: 0 float32 (exact), 1 float16 pairs (half2), 2 none (stream only, timing)
#endif
#define NTHREADS (NWARPS * 32)

// Byte k of w (a signed INT8) as a float: 2^23 + (byte ^ 0x80) placed in a float's mantissa, minus
// 2^23 + 128. One byte permute and one add, no int-to-float conversion unit.
__device__ __forceinline__ float i8_at(uint32_t flipped, int k) {
    return __uint_as_float(__byte_perm(flipped, 0x4B000000u, 0x7540 + k)) - 8388736.0f;
}

__device__ __forceinline__ float gelu_tanh(float x) {
    return 0.5f * x * (1.f + tanhf(0.7978845608028654f * (x + 0.044715f * x * x * x)));
}

// How a warp's rows are cut into ring chunks. A warp's rows are contiguous in W, so a chunk holds
// `rows` whole rows where a row fits a slot (INT8 K = 2560: two rows of a 5 KB slot, where one row a
// chunk left half of every slot unused in the sixteenth run's version), or one `parts`-th of a
// row where it does not (bf16 or INT8 K = 10240). With GELU each group of rows is streamed twice:
// its gate rows, then its up rows (row n_out + r).
struct Geometry {
    int row_bytes, rows, parts, per_group, total;

    __device__ Geometry(int K, int elem_bytes, int nrows_warp, bool gelu) {
        row_bytes = K * elem_bytes;
        const bool fits = row_bytes <= CH_BYTES;
        rows = fits ? min(32, CH_BYTES / row_bytes) : 1;  // <= 32: a lane holds each row's gate
        parts = fits ? 1 : (row_bytes + CH_BYTES - 1) / CH_BYTES;
        per_group = parts * (gelu ? 2 : 1);
        total = (nrows_warp + rows - 1) / rows * per_group;
    }
};

// Chunk `idx` of a warp whose rows start at r0 (end at r1): its group's first row, how many rows it
// holds, gate or up half, which part of a row, the source and the byte count.
struct Chunk {
    int row0, nrows, half, part;
    uint32_t bytes;
    const unsigned char* src;

    __device__ Chunk(const Geometry& g, const unsigned char* W, int n_out, int r0, int r1, int idx) {
        const int group = idx / g.per_group, rem = idx % g.per_group;
        half = rem / g.parts;
        part = rem % g.parts;
        row0 = r0 + group * g.rows;
        nrows = min(g.rows, r1 - row0);
        const int first = part * CH_BYTES;
        bytes = (uint32_t)(g.parts == 1 ? nrows * g.row_bytes : min(CH_BYTES, g.row_bytes - first));
        src = W + (size_t)(row0 + (half ? n_out : 0)) * g.row_bytes + first;
    }
};

// Eight weights (INT8: 8 bytes, bf16: 16 bytes) at step v of a row segment against their 8 inputs.
template <bool WB16>
__device__ __forceinline__ void fma8(const unsigned char* seg, const uint4* x4, int v, float& acc0, float& acc1) {
    const uint4 xv = x4[v];
    if constexpr (WB16) {
        const uint4 w = reinterpret_cast<const uint4*>(seg)[v];
        dot8_bf16(w, xv, acc0, acc1);
    } else {
        const uint2 w = reinterpret_cast<const uint2*>(seg)[v];
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
}

// Sixteen INT8 weights at step v against their 16 inputs (float16, MATH 1), as the engine's Triton
// half2 path does: each byte goes into the low mantissa of the float16 1 + byte / 1024 (one byte
// permute makes two), a packed subtract of 1.125 leaves q / 1024 exactly, eight packed multiply-adds
// leave two float16 sums of eight products, widened and added to float32. ~2 instructions a weight
// where the float32 path takes ~4; the row's sum is scaled by 1024 after.
__device__ __forceinline__ void fma16_half2(const unsigned char* seg, const uint4* xh, int v, float& acc0, float& acc1) {
    const uint4 w = reinterpret_cast<const uint4*>(seg)[v];
    const uint4 xa = xh[2 * v], xb = xh[2 * v + 1];
    const uint32_t ws[4] = {w.x, w.y, w.z, w.w};
    const uint32_t xs[8] = {xa.x, xa.y, xa.z, xa.w, xb.x, xb.y, xb.z, xb.w};
    const __half2 c = __halves2half2(__ushort_as_half(0x3C80), __ushort_as_half(0x3C80));
    __half2 p = __halves2half2(__ushort_as_half(0), __ushort_as_half(0));
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        const uint32_t t = ws[i] ^ 0x80808080u;
        const uint32_t lo = __byte_perm(t, 0x3C3C3C3Cu, 0x4140), hi = __byte_perm(t, 0x3C3C3C3Cu, 0x4342);
        const __half2 h0 = __hsub2(*reinterpret_cast<const __half2*>(&lo), c);
        const __half2 h1 = __hsub2(*reinterpret_cast<const __half2*>(&hi), c);
        p = __hfma2(h0, *reinterpret_cast<const __half2*>(&xs[2 * i]), p);
        p = __hfma2(h1, *reinterpret_cast<const __half2*>(&xs[2 * i + 1]), p);
    }
    const float2 f = __half22float2(p);
    acc0 += f.x;
    acc1 += f.y;
}

// W: INT8 with one float32 scale a row, or bf16 (WB16, scale unused). GELU: W is a gate_up matrix
// [2 n_out, K]; y[r] = gelu_tanh(gate_r) * up_r. y is float32, or bf16 with out_bf16 (rounded once).
template <bool GELU, bool WB16>
__global__ void __launch_bounds__(NTHREADS) one_token_gemv(const unsigned char* __restrict__ W,
                                                           const float* __restrict__ scale,
                                                           const __nv_bfloat16* __restrict__ x,
                                                           void* __restrict__ y, int n_out, int K, int out_bf16) {
    constexpr int EB = WB16 ? 2 : 1;
    constexpr bool HALF2 = !WB16 && MATH == 1;
    extern __shared__ __align__(128) unsigned char smem[];
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    unsigned char* ring = smem + warp * NSLOT * CH_BYTES;
    uint64_t* bars = reinterpret_cast<uint64_t*>(smem + NWARPS * NSLOT * CH_BYTES) + warp * NSLOT;
    __nv_bfloat16* xs = reinterpret_cast<__nv_bfloat16*>(smem + NWARPS * NSLOT * CH_BYTES + NWARPS * NSLOT * 8);

    const long long gw = (long long)blockIdx.x * NWARPS + warp, nw = (long long)gridDim.x * NWARPS;
    const int r0 = (int)(n_out * gw / nw), r1 = (int)(n_out * (gw + 1) / nw);
    const Geometry geo(K, WB16 ? 2 : 1, r1 - r0, GELU);

    // Before the wait: the ring's first chunks (weights: no kernel writes them).
    if (lane == 0) {
        for (int s = 0; s < NSLOT; ++s) mbar_init(bars + s, 1);
        asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
        for (int s = 0; s < NSLOT && s < geo.total; ++s) {
            const Chunk ch(geo, W, n_out, r0, r1, s);
            bulk_load(ring + s * CH_BYTES, ch.src, ch.bytes, bars + s);
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
            if (v >= K / 8) continue;
            if (HALF2) {  // bf16 -> float16 pairs (exact for |x| within float16's normal range)
                uint32_t* h = reinterpret_cast<uint32_t*>(&u[i]);
#pragma unroll
                for (int j = 0; j < 4; ++j) {
                    const __half2 f = __floats2half2_rn(bf_lo(h[j]), bf_hi(h[j]));
                    h[j] = *reinterpret_cast<const uint32_t*>(&f);
                }
            }
            reinterpret_cast<uint4*>(xs)[v] = u[i];
        }
    }
    __syncthreads();

    float acc0 = 0.f, acc1 = 0.f, gate = 0.f;  // gate: lane j holds row j's of the current group
    for (int idx = 0; idx < geo.total; ++idx) {
        const int slot = idx % NSLOT;
        const Chunk ch(geo, W, n_out, r0, r1, idx);
        mbar_wait(bars + slot, (uint32_t)((idx / NSLOT) & 1));
        const int seg_w = geo.parts == 1 ? K : (int)ch.bytes / EB;               // weights a row segment
        const uint4* x4 = reinterpret_cast<const uint4*>(xs + ch.part * (CH_BYTES / EB));
        for (int j = 0; j < ch.nrows; ++j) {
            const unsigned char* seg = ring + slot * CH_BYTES + j * geo.row_bytes;
            if (HALF2) {
#pragma unroll 2
                for (int v = lane; v < seg_w / 16; v += 32) fma16_half2(seg, x4, v, acc0, acc1);
            } else if (MATH != 2) {
#pragma unroll 4
                for (int v = lane; v < seg_w / 8; v += 32) fma8<WB16>(seg, x4, v, acc0, acc1);
            }
            if (ch.part != geo.parts - 1) continue;  // the row goes on in the next chunk
            const float s = warp_sum(acc0 + acc1);
            acc0 = 0.f;
            acc1 = 0.f;
            const int unit = ch.row0 + j;
            const float v = WB16 ? s : s * (HALF2 ? 1024.f : 1.f) * scale[unit + (ch.half ? n_out : 0)];
            if (GELU && !ch.half) {
                if (lane == j) gate = v;  // until the group's up rows
                continue;
            }
            const float out = GELU ? gelu_tanh(__shfl_sync(0xffffffffu, gate, j)) * v : v;
            if (lane == 0) {
                if (out_bf16)
                    reinterpret_cast<__nv_bfloat16*>(y)[unit] = __float2bfloat16(out);
                else
                    reinterpret_cast<float*>(y)[unit] = out;
            }
        }
        __syncwarp();
        if (lane == 0 && idx + NSLOT < geo.total) {  // refill the slot just read
            const Chunk next(geo, W, n_out, r0, r1, idx + NSLOT);
            asm volatile("fence.proxy.async.shared::cta;" ::: "memory");
            bulk_load(ring + slot * CH_BYTES, next.src, next.bytes, bars + slot);
        }
    }
}

extern "C" {

size_t one_token_gemv_smem_bytes(int K) { return (size_t)NWARPS * NSLOT * (CH_BYTES + 8) + (size_t)K * 2; }

// One launch on `stream` with `blocks` blocks: y [n_out] from W [n_out, K] (gelu: W [2 n_out, K],
// y = gelu_tanh(gate) * up); wbf16: W is bf16 and scale unused, else INT8 with float32 scales;
// out_bf16: y is bf16, else float32; pdl: programmatic stream serialization. Returns a cudaError_t
// as int. K must be a multiple of 16, W and x 16-byte aligned.
int one_token_gemv_launch(const void* W, const float* scale, const void* x, void* y, int n_out, int K, int gelu,
                          int wbf16, int out_bf16, int blocks, int pdl, cudaStream_t stream) {
    const size_t smem = one_token_gemv_smem_bytes(K);
    const void* fns[4] = {(const void*)one_token_gemv<false, false>, (const void*)one_token_gemv<true, false>,
                          (const void*)one_token_gemv<false, true>, (const void*)one_token_gemv<true, true>};
    const int which = (gelu ? 1 : 0) + (wbf16 ? 2 : 0);
    // Raise the shared-memory limit only when it grows: the warm-up calls before a CUDA graph capture
    // set it, so nothing but launches happens while a graph is being captured.
    static size_t configured[4] = {0, 0, 0, 0};
    if (smem > configured[which]) {
        cudaError_t err = cudaFuncSetAttribute(fns[which], cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem);
        // All of L1 as shared memory: where two blocks fit an SM (<= 114 KB each), the next kernel's
        // block can become resident beside this one's, and ask for its first chunks while this one
        // streams (PDL), instead of after it exits: one DRAM latency a kernel.
        if (err == cudaSuccess)
            err = cudaFuncSetAttribute(fns[which], cudaFuncAttributePreferredSharedMemoryCarveout, 100);
        if (err != cudaSuccess) return (int)err;
        configured[which] = smem;
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
    const unsigned char* w = (const unsigned char*)W;
    const __nv_bfloat16* xb = (const __nv_bfloat16*)x;
    switch (which) {
        case 0: return (int)cudaLaunchKernelEx(&cfg, one_token_gemv<false, false>, w, scale, xb, y, n_out, K, out_bf16);
        case 1: return (int)cudaLaunchKernelEx(&cfg, one_token_gemv<true, false>, w, scale, xb, y, n_out, K, out_bf16);
        case 2: return (int)cudaLaunchKernelEx(&cfg, one_token_gemv<false, true>, w, scale, xb, y, n_out, K, out_bf16);
        default: return (int)cudaLaunchKernelEx(&cfg, one_token_gemv<true, true>, w, scale, xb, y, n_out, K, out_bf16);
    }
}

}  // extern "C"
