// One decode step of one sequence (batch 1) through all of a Gemma 3 model's layers, as ONE
// persistent kernel: one block per multiprocessor, grid-wide barriers between the stages.
//
// Why: at batch 1 every layer is 4 weight streams (qkv, o, gate_up, down) and 5 short kernels
// (QK-norm/RoPE/cache write, decode attention, its combine, two add + norms). Launched one after
// the other, even under programmatic dependent launch, the short kernels cost ~0.48 ms of a 2.41 ms
// step on an H200 while the weights' copy time is 1.85 ms (docs/benchmarks.md, fifteenth run). Here
// every warp streams ITS share of ALL the step's weights through a small ring in shared memory with
// bulk copies (cp.async.bulk + mbarrier), in the order it will use them, and never waits for data to
// issue the next copy: weights do not depend on activations. While the short stages run and the
// grid waits at a barrier, the rings keep filling, so DRAM stays busy as long as the short stages
// of a layer take less time than the rings' bytes (132 SMs x 160 KB = 21 MB, ~5 us at 4.3 TB/s).
//
// Numerics follow the engine's kernels: float32 accumulators, float32 residual stream, the GEMV
// inputs (normed rows, attention output, GELU x up) rounded to bf16, q/k/v rounded to bf16 after
// QK-norm and RoPE. Sums run in other orders than the Triton kernels', so results agree to float32
// rounding, not bit for bit.
//
// Stages of a layer (B = grid barrier):
//   1. every block: h = h1 + norm(down_out) (layer > 0), x = input_norm(h); block 0 stores h.
//      qkv rows -> qkv_out                                                                  B
//   2. blocks (kv head, split): QK-norm, RoPE, the new token's k/v (one block writes the cache slot),
//      a split of the keys -> partial (max, sum, acc)                                       B
//   3. block 0, one warp per q head: combine the splits -> attn_out (bf16)                  B
//   4. o rows -> o_out                                                                      B
//   5. every block: h = h2 + norm(o_out), x = pre_ffn_norm(h); block 0 stores h.
//      gate and up rows -> act = gelu_tanh(gate) * up (bf16)                                B
//   6. down rows -> down_out                                                                B
// After the last layer block 0 writes hidden_out = h1 + post_ffn_norm(down_out).

#include <cuda_runtime.h>
#include <cuda_bf16.h>
#include <stdint.h>

#include "bulk_copy.cuh"

#ifndef NWARPS
#define NWARPS 16
#endif
#ifndef NSLOT
#define NSLOT 2
#endif
#define NTHREADS (NWARPS * 32)
#define HEAD_DIM 256
// One ring slot: a 2560-wide row is one chunk, a 10240-wide row four, a 2048-wide row one (4 KB).
#ifndef CH_BYTES
#define CH_BYTES 5120
#endif
// Which thread of a block arrives at and polls the grid barrier. Lane 0 of each warp issues that
// warp's bulk copies; a fence on a thread may wait for its own outstanding copies.
#ifndef PF_AHEAD
#define PF_AHEAD 0  // measured slower at 2, 4 and 8 (docs/benchmarks.md)
#endif
#ifndef GEMV_UNROLL
#define GEMV_UNROLL 10
#endif
#ifndef BARRIER_THREAD
#define BARRIER_THREAD 0
#endif
#define CH_ELEMS (CH_BYTES / 2)
#define NEG_BIG (-1.0e30f)
// A split's partial for one q head: acc [D], max, sum, padding (16-byte aligned rows).
#define PART_STRIDE (HEAD_DIM + 4)

typedef __nv_bfloat16 bf16;

// Per layer, every field 8 bytes so the host can build the table as int64s.
struct LayerWeights {
    const bf16* qkv;        // [(NQ + 2 NKV) D, H]
    const bf16* o;          // [H, NQ D]
    const bf16* gate_up;    // [2 I, H]: gate rows, then up rows
    const bf16* down;       // [H, I]
    const float* in_ln;     // [H] norm weights (Gemma scales by 1 + w), float32
    const float* post_attn;
    const float* pre_ffn;
    const float* post_ffn;
    const float* q_norm;    // [D]
    const float* k_norm;
    bf16* k_cache;          // [blocks, block_size, NKV, D]
    bf16* v_cache;
    const float* cos;       // [max_positions, D] (rotate-half layout)
    const float* sin;
    long long window;       // sliding window in tokens, 0: global
};

struct Params {
    const LayerWeights* layers;
    const int* block_table;  // the sequence's cache blocks
    const int* ctx;          // keys including the new token's (device: a CUDA graph replays it)
    const float* hidden_in;  // [H] the scaled embedding, float32
    float* hidden_out;       // [H] the residual stream after the last layer
    float* h1;               // [H] residual after the attention add
    float* h2;               // [H] residual after the MLP add
    float* qkv_out;          // [(NQ + 2 NKV) D]
    float* part;             // [NKV, splits, 2, PART_STRIDE]
    bf16* attn_out;          // [NQ D]
    float* o_out;            // [H]
    bf16* act;               // [I]
    float* down_out;         // [H]
    unsigned int* barrier;   // zero before each launch
    long long* trace;        // nullable: clock64 at each grid barrier's arrival and exit, blocks 0 and last
    long long n_layers, H, I, NQ, NKV, block_size, splits;
    float eps, scale, softcap, pad;
};

// -- small helpers --------------------------------------------------------------------------------

__device__ __forceinline__ float round_bf16(float x) { return __bfloat162float(__float2bfloat16(x)); }

// All blocks arrive, then all leave. `epoch` counts this block's barriers (the counter only grows).
__device__ __forceinline__ void grid_barrier(unsigned int* counter, unsigned int& epoch, long long* trace) {
    __syncthreads();
    epoch += 1;
    if (threadIdx.x == BARRIER_THREAD) {
        const bool traced = trace && (blockIdx.x == 0 || blockIdx.x == gridDim.x - 1);
        long long* row = traced ? trace + (blockIdx.x == 0 ? 0 : 1) * 4096 + 2 * epoch : nullptr;
        if (traced) row[0] = clock64();
#ifndef NO_GRID_BARRIER
        unsigned int target = epoch * gridDim.x;
        asm volatile("red.release.gpu.global.add.u32 [%0], 1;" ::"l"(counter) : "memory");
        unsigned int seen;
        do {
            asm volatile("ld.acquire.gpu.global.u32 %0, [%1];" : "=r"(seen) : "l"(counter) : "memory");
        } while (seen < target);
#endif
        if (traced) row[1] = clock64();
    }
    __syncthreads();
}

// -- the weight stream ----------------------------------------------------------------------------
// Stages 0..3: qkv, o, gate_up, down. A warp owns rows [gw N / W, (gw + 1) N / W) of each; gate_up
// rows are gate/up pairs, streamed gate row then up row. A row is 1+ chunks, a chunk never spans rows.

struct Geometry {
    int rows[4], k[4];
};

struct Cursor {
    int layer, stage, row, r1, half, chunk;
    bool done;
};

__device__ __forceinline__ void warp_rows(const Geometry& g, int stage, int gw, int nw, int& r0, int& r1) {
    long long n = g.rows[stage];
    r0 = (int)(n * gw / nw);
    r1 = (int)(n * (gw + 1) / nw);
}

__device__ __forceinline__ void cursor_settle(Cursor& c, const Geometry& g, int gw, int nw, int n_layers) {
    while (!c.done && c.row >= c.r1) {
        if (++c.stage == 4) {
            c.stage = 0;
            if (++c.layer == n_layers) {
                c.done = true;
                break;
            }
        }
        warp_rows(g, c.stage, gw, nw, c.row, c.r1);
        c.half = 0;
        c.chunk = 0;
    }
}

__device__ __forceinline__ void cursor_next(Cursor& c, const Geometry& g, int gw, int nw, int n_layers) {
    int nch = (g.k[c.stage] + CH_ELEMS - 1) / CH_ELEMS;
    if (++c.chunk == nch) {
        c.chunk = 0;
        if (c.stage == 2 && c.half == 0) {
            c.half = 1;
        } else {
            c.half = 0;
            c.row++;
        }
    }
    cursor_settle(c, g, gw, nw, n_layers);
}

struct Ring {
    unsigned char* slots;  // [NSLOT][CH_BYTES], this warp's
    uint64_t* bars;        // [NSLOT]
    int consumed;
};

// Where a cursor's chunk lives and how many bytes it has.
__device__ __forceinline__ const bf16* chunk_source(const Cursor& c, const Params& p, const Geometry& g, uint32_t& bytes) {
    const LayerWeights& L = p.layers[c.layer];
    const bf16* base = c.stage == 0 ? L.qkv : c.stage == 1 ? L.o : c.stage == 2 ? L.gate_up : L.down;
    const long long K = g.k[c.stage];
    const long long row = c.row + (c.stage == 2 && c.half ? p.I : 0);
    const long long first = (long long)c.chunk * CH_ELEMS;
    bytes = (uint32_t)((K - first < CH_ELEMS ? K - first : CH_ELEMS) * 2);
    return base + row * K + first;
}

// Ask L2 for the prefetch cursor's chunk (PF_AHEAD chunks past the copies in flight) and advance it:
// the L2 extends the ring, so a warp that waits at a grid barrier keeps DRAM busy for longer.
__device__ __forceinline__ void l2_prefetch(Cursor& f, const Params& p, const Geometry& g, int gw, int nw, int lane) {
    if (f.done) return;
    if (lane == 0) {
        uint32_t bytes;
        const bf16* src = chunk_source(f, p, g, bytes);
        asm volatile("cp.async.bulk.prefetch.L2.global [%0], %1;" ::"l"(src), "r"(bytes) : "memory");
    }
    cursor_next(f, g, gw, nw, (int)p.n_layers);
}

#ifndef BARRIER_PF
#define BARRIER_PF 0
#endif
// Before this warp waits at a grid barrier: ask L2 for its next BARRIER_PF chunks past the ring (a
// one-shot prefetch, so DRAM keeps streaming while the grid waits; 0: off).
__device__ __forceinline__ void prefetch_past_ring(const Cursor& c, const Params& p, const Geometry& g, int gw, int nw,
                                                   int lane) {
#if BARRIER_PF > 0
    Cursor f = c;
#pragma unroll 1
    for (int i = 0; i < BARRIER_PF; ++i) l2_prefetch(f, p, g, gw, nw, lane);
#endif
}

// Issue the producer cursor's chunk into `slot` and advance the cursor (all lanes keep it); move the
// L2 prefetch cursor along with it.
__device__ __forceinline__ void ring_issue(Ring& r, int slot, Cursor& c, Cursor& f, const Params& p, const Geometry& g,
                                           int gw, int nw, int lane) {
    if (c.done) return;
    if (lane == 0) {
        uint32_t bytes;
        const bf16* src = chunk_source(c, p, g, bytes);
        // The slot was last read by this warp's generic loads; order them before the async write.
        asm volatile("fence.proxy.async.shared::cta;" ::: "memory");
        bulk_load(r.slots + slot * CH_BYTES, src, bytes, r.bars + slot);
    }
    cursor_next(c, g, gw, nw, (int)p.n_layers);
#if PF_AHEAD > 0
    l2_prefetch(f, p, g, gw, nw, lane);
#endif
}

// This lane's part of the dot product of the next `n` weights in the ring with x[0..n): waits for
// the chunk, frees its slot and refills it. The warp's sum is taken per row (`ring_row`).
__device__ __forceinline__ float ring_dot(Ring& r, const bf16* x, int n, Cursor& c, Cursor& f, const Params& p,
                                          const Geometry& g, int gw, int nw, int lane) {
    int slot = r.consumed % NSLOT;
    mbar_wait(r.bars + slot, (uint32_t)((r.consumed / NSLOT) & 1));
    const uint4* w4 = reinterpret_cast<const uint4*>(r.slots + slot * CH_BYTES);
    const uint4* x4 = reinterpret_cast<const uint4*>(x);  // x in bf16: the same layout as w, no bank conflicts
    float acc0 = 0.f, acc1 = 0.f;
#ifndef STREAM_ONLY
    // Unrolled by GEMV_UNROLL so that many shared-memory loads issue together (all ten of a
    // 5 KB chunk would need ~120 registers).
#pragma unroll 1
    for (int i0 = 0; i0 < CH_ELEMS / 256; i0 += GEMV_UNROLL) {
#pragma unroll
    for (int i = i0; i < i0 + GEMV_UNROLL; ++i) {
        const int v = lane + 32 * i;
        if (v < n / 8) {
            const uint4 w = w4[v], xv = x4[v];
            dot8_bf16(w, xv, acc0, acc1);
        }
    }
    }
#else
    (void)w4;
    (void)x4;
#endif
    __syncwarp();
    ring_issue(r, slot, c, f, p, g, gw, nw, lane);
    r.consumed++;
    return acc0 + acc1;
}

// A whole row of `K` weights against x: the warp's sum, on every lane.
__device__ __forceinline__ float ring_row(Ring& r, const bf16* x, int K, Cursor& c, Cursor& f, const Params& p,
                                          const Geometry& g, int gw, int nw, int lane) {
    float s = 0.f;
    for (int first = 0; first < K; first += CH_ELEMS) {
        int n = K - first < CH_ELEMS ? K - first : CH_ELEMS;
        s += ring_dot(r, x + first, n, c, f, p, g, gw, nw, lane);
    }
    return warp_sum(s);
}

// -- block-wide pieces ----------------------------------------------------------------------------

// 1 / rms from each thread's partial sum of squares; every thread gets it; the order is fixed.
__device__ float block_inv_rms_sum(float ss, int n, float eps, float* red) {
    ss = warp_sum(ss);
    if ((threadIdx.x & 31) == 0) red[threadIdx.x >> 5] = ss;
    __syncthreads();
    float t = 0.f;
#pragma unroll
    for (int w = 0; w < NWARPS; ++w) t += red[w];
    __syncthreads();
    return rsqrtf(t / n + eps);
}

#ifndef MAXV
#define MAXV 2  // float4s a thread holds of an H-vector: H <= MAXV * 4 * NTHREADS (4096)
#endif

// 1 / rms of an H-vector held as MAXV float4s a thread (nv float4s in all).
__device__ __forceinline__ float vector_inv_rms(const float4 (&v)[MAXV], int nv, int H, float eps, float* red) {
    float ss = 0.f;
#pragma unroll
    for (int i = 0; i < MAXV; ++i)
        if (threadIdx.x + i * NTHREADS < nv) ss += v[i].x * v[i].x + v[i].y * v[i].y + v[i].z * v[i].z + v[i].w * v[i].w;
    return block_inv_rms_sum(ss, H, eps, red);
}

// h = r + norm(d) (r, d written by other blocks this launch: read past L1; d == nullptr: h = r),
// then xs = round_bf16(norm(h)) (w_x == nullptr: skipped). Block 0 stores h to `h_out`. All loads
// are issued before the first reduction: one L2 round trip, not one per element.
__device__ void residual_and_norm(const float* r, const float* d, const float* w_d, const float* w_x, float* h_out,
                                  bf16* xs, int H, float eps, float* red) {
    const int nv = H / 4;
    float4 hv[MAXV], dv[MAXV], wd[MAXV], wx[MAXV];
#pragma unroll
    for (int i = 0; i < MAXV; ++i) {
        const int v = threadIdx.x + i * NTHREADS;
        if (v < nv) {
            hv[i] = __ldcg(reinterpret_cast<const float4*>(r) + v);
            if (d) {
                dv[i] = __ldcg(reinterpret_cast<const float4*>(d) + v);
                wd[i] = reinterpret_cast<const float4*>(w_d)[v];
            }
            if (w_x) wx[i] = reinterpret_cast<const float4*>(w_x)[v];
        }
    }
    if (d) {
        const float inv = vector_inv_rms(dv, nv, H, eps, red);
#pragma unroll
        for (int i = 0; i < MAXV; ++i) {
            hv[i].x += dv[i].x * inv * (1.f + wd[i].x);
            hv[i].y += dv[i].y * inv * (1.f + wd[i].y);
            hv[i].z += dv[i].z * inv * (1.f + wd[i].z);
            hv[i].w += dv[i].w * inv * (1.f + wd[i].w);
        }
    }
    if (blockIdx.x == 0 && h_out) {
#pragma unroll
        for (int i = 0; i < MAXV; ++i) {
            const int v = threadIdx.x + i * NTHREADS;
            if (v < nv) reinterpret_cast<float4*>(h_out)[v] = hv[i];
        }
    }
    if (w_x) {
        const float inv = vector_inv_rms(hv, nv, H, eps, red);
#pragma unroll
        for (int i = 0; i < MAXV; ++i) {
            const int v = threadIdx.x + i * NTHREADS;
            if (v < nv) {
                __nv_bfloat162 a = __floats2bfloat162_rn(hv[i].x * inv * (1.f + wx[i].x), hv[i].y * inv * (1.f + wx[i].y));
                __nv_bfloat162 b = __floats2bfloat162_rn(hv[i].z * inv * (1.f + wx[i].z), hv[i].w * inv * (1.f + wx[i].w));
                uint2 u;
                u.x = *reinterpret_cast<uint32_t*>(&a);
                u.y = *reinterpret_cast<uint32_t*>(&b);
                reinterpret_cast<uint2*>(xs)[v] = u;
            }
        }
    }
    __syncthreads();
}

// xs[0..n) = src[0..n) (bf16, written by other blocks this launch); n a multiple of 8.
__device__ void load_bf16_vector(bf16* xs, const bf16* src, int n) {
    const int nv = n / 8;
    uint4 u[4];
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        const int v = threadIdx.x + i * NTHREADS;
        if (v < nv) u[i] = __ldcg(reinterpret_cast<const uint4*>(src) + v);
    }
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        const int v = threadIdx.x + i * NTHREADS;
        if (v < nv) reinterpret_cast<uint4*>(xs)[v] = u[i];
    }
    __syncthreads();
}

// -- attention (stage 2 and 3) --------------------------------------------------------------------

// Key splits of a layer's n keys: ~2 keys a warp, at most one block per (kv head, split).
__device__ __forceinline__ int attention_splits(int n, int max_splits) {
    int s = (n + 2 * NWARPS - 1) / (2 * NWARPS);
    return s < 1 ? 1 : (s > max_splits ? max_splits : s);
}

struct AttnRange {
    int ctx, pos, S, g, s, p0, p1;
    bool active;
};

__device__ __forceinline__ AttnRange attention_range(const Params& p, const LayerWeights& L) {
    AttnRange a;
    a.ctx = *p.ctx;
    a.pos = a.ctx - 1;
    const int start = L.window > 0 && a.ctx > L.window ? a.ctx - (int)L.window : 0;
    a.S = attention_splits(a.ctx - start, (int)p.splits);
    a.active = blockIdx.x < p.NKV * a.S;
    a.g = blockIdx.x / a.S;
    a.s = blockIdx.x % a.S;
    const int span = (a.ctx - start + a.S - 1) / a.S;
    a.p0 = start + a.s * span;
    a.p1 = min(a.ctx, a.p0 + span);
    return a;
}

// The first two keys and values of this warp, read before the grid barrier (they were written by
// earlier steps; the new token's are made after the barrier).
#ifdef NO_ATTN_PREFETCH
#define PREFETCHED false
#else
#define PREFETCHED true
#endif
struct AttnPre {
    uint4 k[2], v[2];
};

__device__ __forceinline__ size_t cache_offset(const Params& p, int t, int g) {
    const int bs = (int)p.block_size;
    long long slot = (long long)p.block_table[t / bs] * bs + t % bs;
    return (size_t)(slot * p.NKV + g) * HEAD_DIM;
}

// Before the barrier: this block's keys and values (two a warp) and the constants of the q/k
// preparation (norm weights, the RoPE row) into `ac` [4][D].
__device__ void attention_prefetch(const Params& p, const LayerWeights& L, const AttnRange& a, AttnPre& pre,
                                   float* ac) {
    if (!a.active) return;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
#ifndef NO_ATTN_PREFETCH
#pragma unroll
    for (int j = 0; j < 2; ++j) {
        const int t = a.p0 + warp + j * NWARPS;
        if (t < a.p1 && t != a.pos) {
            const size_t off = cache_offset(p, t, a.g) + lane * 8;
            pre.k[j] = __ldcg(reinterpret_cast<const uint4*>(L.k_cache + off));
            pre.v[j] = __ldcg(reinterpret_cast<const uint4*>(L.v_cache + off));
        }
    }
#endif
    for (int e = threadIdx.x; e < 4 * HEAD_DIM; e += NTHREADS) {
        const int which = e / HEAD_DIM, i = e % HEAD_DIM;
        ac[e] = which == 0 ? L.q_norm[i] : which == 1 ? L.k_norm[i]
              : which == 2 ? L.cos[(size_t)a.pos * HEAD_DIM + i] : L.sin[(size_t)a.pos * HEAD_DIM + i];
    }
}

__device__ __forceinline__ void unpack8(const uint4& u, float* f) {
    f[0] = bf_lo(u.x); f[1] = bf_hi(u.x); f[2] = bf_lo(u.y); f[3] = bf_hi(u.y);
    f[4] = bf_lo(u.z); f[5] = bf_hi(u.z); f[6] = bf_lo(u.w); f[7] = bf_hi(u.w);
}

// One block per (kv head g, split s): this kv head's two q heads over a split of the keys.
__device__ void attention_split(const Params& p, const LayerWeights& L, const AttnRange& a, const AttnPre& pre,
                                float* scratch, const float* ac) {
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, e0 = lane * 8;
    const int NQ = (int)p.NQ, NKV = (int)p.NKV, g = a.g, pos = a.pos;
    float* qs = scratch;                      // [2][D]
    float* kn = qs + 2 * HEAD_DIM;            // [D] the new token's key
    float* vn = kn + HEAD_DIM;                // [D] and value
    float* wm = vn + HEAD_DIM;                // [NWARPS][2]
    float* wl = wm + 2 * NWARPS;              // [NWARPS][2]
    float* wa = wl + 2 * NWARPS;              // [NWARPS][2][D]
    if (warp < 4) {  // warps 0, 1: q heads 2g, 2g+1; warp 2: k; warp 3: v
        const float* src = warp < 2 ? p.qkv_out + (size_t)(2 * g + warp) * HEAD_DIM
                         : warp == 2 ? p.qkv_out + (size_t)(NQ + g) * HEAD_DIM
                                     : p.qkv_out + (size_t)(NQ + NKV + g) * HEAD_DIM;
        float x[8];
        float4 lo = __ldcg(reinterpret_cast<const float4*>(src + e0));
        float4 hi = __ldcg(reinterpret_cast<const float4*>(src + e0 + 4));
        x[0] = lo.x; x[1] = lo.y; x[2] = lo.z; x[3] = lo.w; x[4] = hi.x; x[5] = hi.y; x[6] = hi.z; x[7] = hi.w;
        if (warp < 3) {
            const float* w = ac + (warp < 2 ? 0 : HEAD_DIM);
            const float* c = ac + 2 * HEAD_DIM + e0;
            const float* sn = ac + 3 * HEAD_DIM + e0;
            float ss = 0.f;
#pragma unroll
            for (int i = 0; i < 8; ++i) ss = fmaf(x[i], x[i], ss);
            const float inv = rsqrtf(warp_sum(ss) / HEAD_DIM + p.eps);
#pragma unroll
            for (int i = 0; i < 8; ++i) x[i] = x[i] * inv * (1.f + w[e0 + i]);
#pragma unroll
            for (int i = 0; i < 8; ++i) {
                const float partner = __shfl_xor_sync(0xffffffffu, x[i], 16);  // element e +- D/2
                const float rot = e0 < HEAD_DIM / 2 ? -partner : partner;
                x[i] = x[i] * c[i] + rot * sn[i];
            }
        }
        float* dst = warp < 2 ? qs + warp * HEAD_DIM : warp == 2 ? kn : vn;
#pragma unroll
        for (int i = 0; i < 8; ++i) dst[e0 + i] = round_bf16(x[i]);
        if (warp >= 2 && a.s == a.S - 1) {  // the last split stores the new token's key and value
            bf16* out = (warp == 2 ? L.k_cache : L.v_cache) + cache_offset(p, pos, g) + e0;
            uint4 u;
            __nv_bfloat162 b0 = __floats2bfloat162_rn(x[0], x[1]), b1 = __floats2bfloat162_rn(x[2], x[3]);
            __nv_bfloat162 b2 = __floats2bfloat162_rn(x[4], x[5]), b3 = __floats2bfloat162_rn(x[6], x[7]);
            u.x = *reinterpret_cast<uint32_t*>(&b0); u.y = *reinterpret_cast<uint32_t*>(&b1);
            u.z = *reinterpret_cast<uint32_t*>(&b2); u.w = *reinterpret_cast<uint32_t*>(&b3);
            *reinterpret_cast<uint4*>(out) = u;
        }
    }
    __syncthreads();
    // q stays in shared memory (registers are the kernel's limit: 128 a thread at 512 threads).
    const float* q0 = qs + e0;
    const float* q1 = qs + HEAD_DIM + e0;
    float a0[8], a1[8];
#pragma unroll
    for (int i = 0; i < 8; ++i) {
        a0[i] = 0.f;
        a1[i] = 0.f;
    }
    float m0 = NEG_BIG, m1 = NEG_BIG, l0 = 0.f, l1 = 0.f;
    int j = 0;
    for (int t = a.p0 + warp; t < a.p1; t += NWARPS, ++j) {
        float k[8], v[8];
        if (t == pos) {
#pragma unroll
            for (int i = 0; i < 8; ++i) {
                k[i] = kn[e0 + i];
                v[i] = vn[e0 + i];
            }
        } else if (PREFETCHED && j < 2) {
            unpack8(j == 0 ? pre.k[0] : pre.k[1], k);
            unpack8(j == 0 ? pre.v[0] : pre.v[1], v);
        } else {
            const size_t off = cache_offset(p, t, g) + e0;
            unpack8(__ldcg(reinterpret_cast<const uint4*>(L.k_cache + off)), k);
            unpack8(__ldcg(reinterpret_cast<const uint4*>(L.v_cache + off)), v);
        }
        float d0 = 0.f, d1 = 0.f;
#pragma unroll
        for (int i = 0; i < 8; ++i) {
            d0 = fmaf(q0[i], k[i], d0);
            d1 = fmaf(q1[i], k[i], d1);
        }
        d0 = warp_sum(d0) * p.scale;
        d1 = warp_sum(d1) * p.scale;
        if (p.softcap > 0.f) {
            d0 = tanhf(d0 / p.softcap) * p.softcap;
            d1 = tanhf(d1 / p.softcap) * p.softcap;
        }
        const float n0 = fmaxf(m0, d0), n1 = fmaxf(m1, d1);
        const float c0 = __expf(m0 - n0), c1 = __expf(m1 - n1), f0 = __expf(d0 - n0), f1 = __expf(d1 - n1);
        l0 = l0 * c0 + f0;
        l1 = l1 * c1 + f1;
#pragma unroll
        for (int i = 0; i < 8; ++i) {
            a0[i] = a0[i] * c0 + f0 * v[i];
            a1[i] = a1[i] * c1 + f1 * v[i];
        }
        m0 = n0;
        m1 = n1;
    }
    if (lane == 0) {
        wm[warp * 2] = m0;
        wm[warp * 2 + 1] = m1;
        wl[warp * 2] = l0;
        wl[warp * 2 + 1] = l1;
    }
#pragma unroll
    for (int i = 0; i < 8; ++i) {
        wa[(warp * 2) * HEAD_DIM + e0 + i] = a0[i];
        wa[(warp * 2 + 1) * HEAD_DIM + e0 + i] = a1[i];
    }
    __syncthreads();
    // Combine the warps: thread t owns head t / D, element t % D (NTHREADS == 2 D).
    const int h = threadIdx.x / HEAD_DIM, e = threadIdx.x % HEAD_DIM;
    float M = NEG_BIG;
#pragma unroll
    for (int w = 0; w < NWARPS; ++w) M = fmaxf(M, wm[w * 2 + h]);
    float Ls = 0.f, A = 0.f;
#pragma unroll
    for (int w = 0; w < NWARPS; ++w) {
        const float f = __expf(wm[w * 2 + h] - M);
        Ls = fmaf(f, wl[w * 2 + h], Ls);
        A = fmaf(f, wa[(w * 2 + h) * HEAD_DIM + e], A);
    }
    float* out = p.part + ((size_t)(g * a.S + a.s) * 2 + h) * PART_STRIDE;
    out[e] = A;
    if (e == 0) {
        out[HEAD_DIM] = M;
        out[HEAD_DIM + 1] = Ls;
    }
}

// One warp per q head: the splits' partials -> attn_out (bf16). Lanes read the splits' max and sum
// in parallel; the accumulators' loads are unrolled so several are in flight.
__device__ void attention_combine(const Params& p, const AttnRange& a, int qh) {
    const int lane = threadIdx.x & 31, e0 = lane * 8, S = a.S;
    const int g = qh / 2, h = qh % 2;
    const float* base = p.part + ((size_t)g * S * 2 + h) * PART_STRIDE;
    const size_t stride = 2 * PART_STRIDE;
    float ma = NEG_BIG, mb = NEG_BIG, la = 0.f, lb = 0.f;
    if (lane < S) {
        ma = __ldcg(base + lane * stride + HEAD_DIM);
        la = __ldcg(base + lane * stride + HEAD_DIM + 1);
    }
    if (lane + 32 < S) {
        mb = __ldcg(base + (lane + 32) * stride + HEAD_DIM);
        lb = __ldcg(base + (lane + 32) * stride + HEAD_DIM + 1);
    }
    float M = fmaxf(ma, mb);
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) M = fmaxf(M, __shfl_xor_sync(0xffffffffu, M, o));
    const float fa = __expf(ma - M), fb = __expf(mb - M);
    const float Ls = warp_sum(fa * la + fb * lb);
    float A[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
#pragma unroll 4
    for (int s = 0; s < S; ++s) {
        const float f = __shfl_sync(0xffffffffu, s < 32 ? fa : fb, s & 31);
        const float4 lo = __ldcg(reinterpret_cast<const float4*>(base + s * stride + e0));
        const float4 hi = __ldcg(reinterpret_cast<const float4*>(base + s * stride + e0 + 4));
        A[0] = fmaf(f, lo.x, A[0]); A[1] = fmaf(f, lo.y, A[1]); A[2] = fmaf(f, lo.z, A[2]); A[3] = fmaf(f, lo.w, A[3]);
        A[4] = fmaf(f, hi.x, A[4]); A[5] = fmaf(f, hi.y, A[5]); A[6] = fmaf(f, hi.z, A[6]); A[7] = fmaf(f, hi.w, A[7]);
    }
    bf16* out = p.attn_out + (size_t)qh * HEAD_DIM + e0;
#pragma unroll
    for (int i = 0; i < 8; ++i) out[i] = __float2bfloat16(A[i] / Ls);
}

__device__ __forceinline__ float gelu_tanh(float x) {
    return 0.5f * x * (1.f + tanhf(0.7978845608028654f * (x + 0.044715f * x * x * x)));
}

// The end of a stage: the optional L2 prefetch past the ring, then the grid barrier.
__device__ __forceinline__ void stage_end(const Cursor& c, const Params& p, const Geometry& g, int gw, int nw, int lane,
                                          unsigned int& epoch) {
    prefetch_past_ring(c, p, g, gw, nw, lane);
    grid_barrier(p.barrier, epoch, p.trace);
}

// -- the kernel -----------------------------------------------------------------------------------

__global__ void __launch_bounds__(NTHREADS, 1) decode_step_kernel(Params p) {
    extern __shared__ __align__(128) unsigned char smem[];
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int H = (int)p.H, I = (int)p.I, NQ = (int)p.NQ, NKV = (int)p.NKV;
    const int gw = blockIdx.x * NWARPS + warp, nw = gridDim.x * NWARPS;
    // Shared memory: the rings and their barriers, the attention's constants [4][D], red [64], then
    // x (the GEMV input, bf16; also the attention's float32 scratch). Everything before x sits at a
    // fixed offset: with ac placed after x (at a runtime offset) nvcc 13.0 built a wrong address for
    // it in one build (compute-sanitizer: out-of-bounds shared reads in attention_split).
    unsigned char* rings = smem;
    uint64_t* bars = reinterpret_cast<uint64_t*>(smem + NWARPS * NSLOT * CH_BYTES);
    float* ac = reinterpret_cast<float*>(bars + NWARPS * NSLOT);
    float* red = ac + 4 * HEAD_DIM;
    float* xs = red + 64;
    bf16* xb = reinterpret_cast<bf16*>(xs);
    Geometry geo;
    geo.rows[0] = (NQ + 2 * NKV) * HEAD_DIM; geo.k[0] = H;
    geo.rows[1] = H;                         geo.k[1] = NQ * HEAD_DIM;
    geo.rows[2] = I;                         geo.k[2] = H;
    geo.rows[3] = H;                         geo.k[3] = I;

    Ring ring;
    ring.slots = rings + warp * NSLOT * CH_BYTES;
    ring.bars = bars + warp * NSLOT;
    ring.consumed = 0;
    if (lane == 0) {
        for (int s = 0; s < NSLOT; ++s) mbar_init(ring.bars + s, 1);
        asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
    }
    __syncwarp();
    Cursor pc;  // the producer's position: NSLOT chunks ahead of the consumer
    pc.layer = 0; pc.stage = 0; pc.half = 0; pc.chunk = 0; pc.done = false;
    warp_rows(geo, 0, gw, nw, pc.row, pc.r1);
    cursor_settle(pc, geo, gw, nw, (int)p.n_layers);
    Cursor pf = pc;  // the L2 prefetch cursor: PF_AHEAD chunks past the bulk copies
    for (int s = 0; s < NSLOT; ++s) ring_issue(ring, s, pc, pf, p, geo, gw, nw, lane);
    pf = pc;
    for (int s = 0; s < PF_AHEAD; ++s) l2_prefetch(pf, p, geo, gw, nw, lane);

    unsigned int epoch = 0;
    if (p.trace && threadIdx.x == BARRIER_THREAD && (blockIdx.x == 0 || blockIdx.x == gridDim.x - 1))
        p.trace[(blockIdx.x == 0 ? 0 : 1) * 4096] = clock64();
    for (int l = 0; l < (int)p.n_layers; ++l) {
        const LayerWeights& L = p.layers[l];
        // 1. input norm (after the previous layer's MLP add), qkv
        if (l == 0)
            residual_and_norm(p.hidden_in, nullptr, nullptr, L.in_ln, p.h2, xb, H, p.eps, red);
        else
            residual_and_norm(p.h1, p.down_out, p.layers[l - 1].post_ffn, L.in_ln, p.h2, xb, H, p.eps, red);
        {
            int r0, r1;
            warp_rows(geo, 0, gw, nw, r0, r1);
            for (int r = r0; r < r1; ++r) {
                float v = ring_row(ring, xb, H, pc, pf, p, geo, gw, nw, lane);
                if (lane == 0) p.qkv_out[r] = v;
            }
        }
#ifndef SKIP_ATTENTION  // (timing experiments only: attn_out keeps its last value)
        const AttnRange ar = attention_range(p, L);
        AttnPre pre;
        attention_prefetch(p, L, ar, pre, ac);
        stage_end(pc, p, geo, gw, nw, lane, epoch);
        // 2. attention splits
        if (ar.active) attention_split(p, L, ar, pre, xs, ac);
        stage_end(pc, p, geo, gw, nw, lane, epoch);
        // 3. combine
        if (blockIdx.x == 0 && warp < NQ) attention_combine(p, ar, warp);
        stage_end(pc, p, geo, gw, nw, lane, epoch);
#else
        stage_end(pc, p, geo, gw, nw, lane, epoch);
#endif
        // 4. o
        load_bf16_vector(xb, p.attn_out, NQ * HEAD_DIM);
        {
            int r0, r1;
            warp_rows(geo, 1, gw, nw, r0, r1);
            for (int r = r0; r < r1; ++r) {
                float v = ring_row(ring, xb, NQ * HEAD_DIM, pc, pf, p, geo, gw, nw, lane);
                if (lane == 0) p.o_out[r] = v;
            }
        }
        stage_end(pc, p, geo, gw, nw, lane, epoch);
        // 5. attention add, pre-MLP norm, gate_up -> act
        residual_and_norm(p.h2, p.o_out, L.post_attn, L.pre_ffn, p.h1, xb, H, p.eps, red);
        {
            int r0, r1;
            warp_rows(geo, 2, gw, nw, r0, r1);
            for (int r = r0; r < r1; ++r) {
                float gate = ring_row(ring, xb, H, pc, pf, p, geo, gw, nw, lane);
                float up = ring_row(ring, xb, H, pc, pf, p, geo, gw, nw, lane);
                if (lane == 0) p.act[r] = __float2bfloat16(gelu_tanh(gate) * up);
            }
        }
        stage_end(pc, p, geo, gw, nw, lane, epoch);
        // 6. down
        load_bf16_vector(xb, p.act, I);
        {
            int r0, r1;
            warp_rows(geo, 3, gw, nw, r0, r1);
            for (int r = r0; r < r1; ++r) {
                float v = ring_row(ring, xb, I, pc, pf, p, geo, gw, nw, lane);
                if (lane == 0) p.down_out[r] = v;
            }
        }
        stage_end(pc, p, geo, gw, nw, lane, epoch);
    }
    if (blockIdx.x == 0) {
        const LayerWeights& L = p.layers[p.n_layers - 1];
        residual_and_norm(p.h1, p.down_out, L.post_ffn, nullptr, p.hidden_out, xb, H, p.eps, red);
    }
}

// -- host side ------------------------------------------------------------------------------------

extern "C" {

// Dynamic shared memory the kernel needs for hidden size H and intermediate size I.
size_t gemma_decode_smem_bytes(long long H, long long I) {
    long long xs_len = I > H ? I : H;
    return (size_t)NWARPS * NSLOT * CH_BYTES + (size_t)NWARPS * NSLOT * 8 + (size_t)(xs_len + 4 * HEAD_DIM + 64) * 4;
}

// Launch one step on `stream` with `blocks` blocks (at most one per multiprocessor). Returns a
// cudaError_t as int.
int gemma_decode_launch(const Params* params, int blocks, cudaStream_t stream) {
    size_t smem = gemma_decode_smem_bytes(params->H, params->I);
    cudaError_t err = cudaFuncSetAttribute(decode_step_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem);
    if (err != cudaSuccess) return (int)err;
    Params local = *params;
    void* args[] = {&local};
    return (int)cudaLaunchCooperativeKernel((const void*)decode_step_kernel, dim3(blocks), dim3(NTHREADS), args, smem,
                                           stream);
}

int gemma_decode_threads() { return NTHREADS; }
int gemma_decode_chunk_bytes() { return CH_BYTES; }

}  // extern "C"
