// Fused CUDA kernels for one GPT-2 forward over T new tokens (gpt2_cupy/fused.py launches them).
//
// Each kernel's specification is a function of gpt2_numpy/model.py, named beside it; the tests
// (tests/test_cupy_kernels.py) hold each against that NumPy function. Activations, the residual
// stream, the KV cache, biases and layer-norm parameters are float32; weight matrices are stored
// as float32, float16 or bfloat16 (the tag types below) and every sum is accumulated in float32.
// No header is included, so that NVRTC compiles this file on any CUDA installation.

typedef unsigned short u16;

__device__ __forceinline__ float f16_to_float(u16 h) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
    return f;
}

__device__ __forceinline__ float bf16_to_float(u16 h) {
    return __uint_as_float(((unsigned)h) << 16);  // bfloat16 is float32's upper half
}

// A weight type: how many weights a 16-byte load holds, and how to widen them to float32.
struct F32 {
    static constexpr int PER16 = 4;
    __device__ static void widen(uint4 u, float* f) {
        f[0] = __uint_as_float(u.x); f[1] = __uint_as_float(u.y);
        f[2] = __uint_as_float(u.z); f[3] = __uint_as_float(u.w);
    }
    __device__ static float at(const void* w, long long i) { return ((const float*)w)[i]; }
};

// Eight 16-bit weights in 16 bytes, widened with CONVERT; little-endian: the lower half of
// each 32-bit word is the earlier weight.
template <float (*CONVERT)(u16)>
__device__ __forceinline__ void widen_halves(uint4 u, float* f) {
    const unsigned words[4] = {u.x, u.y, u.z, u.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        f[2 * i] = CONVERT((u16)(words[i] & 0xffffu));
        f[2 * i + 1] = CONVERT((u16)(words[i] >> 16));
    }
}

struct F16 {
    static constexpr int PER16 = 8;
    __device__ static void widen(uint4 u, float* f) { widen_halves<f16_to_float>(u, f); }
    __device__ static float at(const void* w, long long i) { return f16_to_float(((const u16*)w)[i]); }
};

struct BF16 {
    static constexpr int PER16 = 8;
    __device__ static void widen(uint4 u, float* f) { widen_halves<bf16_to_float>(u, f); }
    __device__ static float at(const void* w, long long i) { return bf16_to_float(((const u16*)w)[i]); }
};

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
    return v;
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, offset));
    return v;
}

// Sum (or max) over the block; every thread gets the result. scratch: 32 floats of shared memory.
template <bool MAX>
__device__ float block_reduce(float v, float* scratch) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, n_warps = (blockDim.x + 31) >> 5;
    v = MAX ? warp_max(v) : warp_sum(v);
    __syncthreads();  // scratch may still be read by a previous call
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    v = lane < n_warps ? scratch[lane] : (MAX ? -3.0e38f : 0.0f);
    return MAX ? warp_max(v) : warp_sum(v);
}

// model.forward's first line: x[t] = wte[ids[t]] + wpe[positions[t]].  grid T, any block size.
template <class W>
__global__ void embed(const void* wte, const void* wpe, const long long* ids,
                      const long long* positions, float* x, int d) {
    const int t = blockIdx.x;
    const long long token = ids[t], pos = positions[t];
    for (int i = threadIdx.x; i < d; i += blockDim.x)
        x[(long long)t * d + i] = W::at(wte, token * d + i) + W::at(wpe, pos * d + i);
}

// model.layer_norm on each of T rows of x [T, d]: out = g * (x - mean) / sqrt(var + eps) + b.
// grid T, block 256.
extern "C" __global__ void layer_norm(const float* x, const float* g, const float* b, float* out, int d,
                           float eps) {
    __shared__ float scratch[32];
    const float* row = x + (long long)blockIdx.x * d;
    float s = 0.0f;
    for (int i = threadIdx.x; i < d; i += blockDim.x) s += row[i];
    const float mean = block_reduce<false>(s, scratch) / d;
    float ss = 0.0f;
    for (int i = threadIdx.x; i < d; i += blockDim.x) {
        const float c = row[i] - mean;
        ss += c * c;
    }
    const float inv_std = 1.0f / sqrtf(block_reduce<false>(ss, scratch) / d + eps);
    for (int i = threadIdx.x; i < d; i += blockDim.x)
        out[(long long)blockIdx.x * d + i] = g[i] * ((row[i] - mean) * inv_std) + b[i];
}

// model.gelu (the tanh approximation GPT-2 was trained with).
__device__ __forceinline__ float gelu(float x) {
    return 0.5f * x * (1.0f + tanhf(0.7978845608028654f * (x + 0.044715f * x * x * x)));
}

// gemv's epilogue flags; LN_INPUT: x is the residual stream and the product's input is
// layer_norm(x) with (ln_g, ln_b), computed on the way in (model.layer_norm, then model.linear).
enum { ADD_BIAS = 0, GELU = 1, ADD_RESIDUAL = 2, LN_INPUT = 4 };

// model.linear (then gelu, or plus a residual): y[t, j] = sum_i x[t, i] w[i, j] + b[j] for T
// rows of x [T, n] and w [n, m] as the checkpoint stores it.
//
// The weights are read once, by 16-byte loads that are contiguous across a warp. A block covers
// COLS = 32 * PER16 columns (each lane PER16 of them) and a slice of `kc` rows of w (split-K, so
// that even a [d, d] matrix spreads over enough blocks to keep the memory busy); its 8 warps take
// every 8th row of the slice. Each block writes its partial sums to `partial` [S, T, m]; the last
// block of a column tile to finish (counted in `counters`, reset for the next launch) adds the S
// partials in a fixed order, so results do not depend on which block ran first, and applies the
// epilogue. y may be the residual itself (x += proj(h), in place). grid (ceil(m / COLS), S),
// block 256, kc <= 256 and a multiple of 8 (fused.split_k_rows chooses it per shape, S any
// number). Two launches must never share `partial` and `counters` while both run.
template <class W, int T>
__global__ void __launch_bounds__(256) gemv(const float* x, const void* w, const float* bias,
                                            const float* residual, float* y, float* partial,
                                            unsigned* counters, const float* ln_g,
                                            const float* ln_b, int n, int m, int kc, int epilogue) {
    constexpr int P = W::PER16, COLS = 32 * P, UNROLL = T <= 2 ? 8 : T <= 8 ? 4 : 2;
    __shared__ float xs[T][256];  // this slice of the input: x[:, k0:k1], or its layer norm
    __shared__ float sums[8][COLS];  // one row t of the 8 warps' sums
    __shared__ float stats[T][2];  // LN_INPUT: each row's mean and 1 / std
    __shared__ bool last;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int k0 = blockIdx.y * kc, k1 = min(n, k0 + kc), rows = k1 - k0;
    const int col = blockIdx.x * COLS + lane * P;  // this lane's first column; m % P == 0
    // This warp's rows of w are k = warp, warp + 8, ...; the first UNROLL of them are requested
    // now, so that they arrive while the block prepares its slice of x.
    const char* base = (const char*)w + ((long long)k0 * m + col) * (16 / P);
    const long long row_bytes = (long long)8 * m * (16 / P);  // from one of this warp's rows to the next
    uint4 next[UNROLL];
#pragma unroll
    for (int u = 0; u < UNROLL; ++u)
        if (col < m && warp + 8 * u < rows) next[u] = __ldg((const uint4*)(base + (warp + 8 * u) * (row_bytes / 8)));
    if (epilogue & LN_INPUT) {  // one warp per row of x: mean, then variance about it
        for (int t = warp; t < T; t += 8) {
            const float* row = x + (long long)t * n;
            float s = 0.0f;
            for (int i = lane; i < n; i += 32) s += row[i];
            const float mean = warp_sum(s) / n;
            float ss = 0.0f;
            for (int i = lane; i < n; i += 32) {
                const float c = row[i] - mean;
                ss += c * c;
            }
            ss = warp_sum(ss);
            if (lane == 0) {
                stats[t][0] = mean;
                stats[t][1] = 1.0f / sqrtf(ss / n + 1e-5f);
            }
        }
        __syncthreads();
    }
    for (int i = threadIdx.x; i < T * rows; i += blockDim.x) {
        const int t = i / rows, k = k0 + i % rows;
        const float v = x[(long long)t * n + k];
        xs[t][i % rows] = (epilogue & LN_INPUT)
            ? ln_g[k] * ((v - stats[t][0]) * stats[t][1]) + ln_b[k] : v;
    }
    __syncthreads();

    float acc[T][P];
#pragma unroll
    for (int t = 0; t < T; ++t)
#pragma unroll
        for (int p = 0; p < P; ++p) acc[t][p] = 0.0f;
    if (col < m) {
        // UNROLL rows at a time: use the loads in hand while the next UNROLL are requested
        for (int k = warp; k < rows; k += 8 * UNROLL) {
            uint4 here[UNROLL];
#pragma unroll
            for (int u = 0; u < UNROLL; ++u) {
                here[u] = next[u];
                const int ahead = k + 8 * (UNROLL + u);
                if (ahead < rows) next[u] = __ldg((const uint4*)(base + ahead * (row_bytes / 8)));
            }
#pragma unroll
            for (int u = 0; u < UNROLL; ++u) {
                if (k + 8 * u >= rows) break;
                float wk[P];
                W::widen(here[u], wk);
#pragma unroll
                for (int t = 0; t < T; ++t) {
                    const float xk = xs[t][k + 8 * u];
#pragma unroll
                    for (int p = 0; p < P; ++p) acc[t][p] = fmaf(xk, wk[p], acc[t][p]);
                }
            }
        }
    }

    const int tiles_col = blockIdx.x * COLS;
#pragma unroll
    for (int t = 0; t < T; ++t) {  // the 8 warps' sums, added in a fixed order
#pragma unroll
        for (int p = 0; p < P; ++p) sums[warp][lane * P + p] = acc[t][p];
        __syncthreads();
        for (int c = threadIdx.x; c < COLS; c += blockDim.x) {
            float s = 0.0f;
#pragma unroll
            for (int v = 0; v < 8; ++v) s += sums[v][c];
            if (tiles_col + c < m) partial[((long long)blockIdx.y * T + t) * m + tiles_col + c] = s;
        }
        __syncthreads();
    }

    __threadfence();  // this block's partials are visible before it is counted
    if (threadIdx.x == 0) last = atomicAdd(&counters[blockIdx.x], 1u) == gridDim.y - 1;
    __syncthreads();
    if (!last) return;
    __threadfence();
    const int S = gridDim.y;
    for (int i = threadIdx.x; i < T * COLS; i += blockDim.x) {
        const int t = i / COLS, j = tiles_col + i % COLS;
        if (j >= m) continue;
        const float* p = partial + (long long)t * m + j;
        const long long stride = (long long)T * m;
        float s0 = 0.0f, s1 = 0.0f, s2 = 0.0f, s3 = 0.0f;  // four loads in flight at a time
        int slice = 0;
        for (; slice + 4 <= S; slice += 4) {  // __ldcg: from L2, never a stale L1 line
            s0 += __ldcg(p + slice * stride);
            s1 += __ldcg(p + (slice + 1) * stride);
            s2 += __ldcg(p + (slice + 2) * stride);
            s3 += __ldcg(p + (slice + 3) * stride);
        }
        for (; slice < S; ++slice) s0 += __ldcg(p + slice * stride);
        float s = (s0 + s1) + (s2 + s3) + bias[j];
        if (epilogue & GELU) s = gelu(s);
        if (epilogue & ADD_RESIDUAL) s += residual[(long long)t * m + j];
        y[(long long)t * m + j] = s;
    }
    if (threadIdx.x == 0) counters[blockIdx.x] = 0;
}

// model.lm_head: logits[t, v] = sum_i x[t, i] wte[v, i] (x @ wte.T, the tied head).
// One warp per vocabulary row, 16-byte loads along the row, a warp sum per row t.
// grid ceil(V / 8), block 256.
template <class W, int T>
__global__ void __launch_bounds__(256) lm_head(const float* x, const void* wte, float* logits,
                                               int d, int V) {
    constexpr int P = W::PER16;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int v = blockIdx.x * 8 + warp;
    if (v >= V) return;  // no barrier below: a whole warp leaves
    const char* row = (const char*)wte + (long long)v * d * (16 / P);
    float acc[T];
#pragma unroll
    for (int t = 0; t < T; ++t) acc[t] = 0.0f;
#pragma unroll 4
    for (int c = lane; c < d / P; c += 32) {
        float wc[P];
        W::widen(__ldg((const uint4*)(row + (long long)c * 16)), wc);
#pragma unroll
        for (int t = 0; t < T; ++t) {
            const float4* xt = (const float4*)(x + (long long)t * d + c * P);
#pragma unroll
            for (int q = 0; q < P / 4; ++q) {
                const float4 xv = __ldg(xt + q);
                acc[t] += xv.x * wc[4 * q] + xv.y * wc[4 * q + 1] + xv.z * wc[4 * q + 2] +
                          xv.w * wc[4 * q + 3];
            }
        }
    }
#pragma unroll
    for (int t = 0; t < T; ++t) {
        const float s = warp_sum(acc[t]);
        if (lane == 0) logits[(long long)t * V + v] = s;
    }
}

// model.causal_self_attention after the qkv product, for one layer: writes this call's keys and
// values into the cache and attends each query to keys 0..its own position.
//   qkv [T, 3d]: q | k | v, head h in columns h*D..h*D+D of each third (model.qkv_heads);
//   k_cache, v_cache [H, C, D]; positions [T], consecutive (the new tokens follow the cache);
//   out [T, d], heads merged (model.merge_heads).
// One block per (head, query), 8 warps; warp w takes keys w, w + 8, ..., its lanes E = D / 32
// dimensions each (one, on the first D lanes, when D < 32). Each warp keeps a running softmax
// (max, sum, weighted sum of values), and the 8 are merged at the end: the same sums as
// softmax(scores) @ v, in another order. Keys before positions[0] come from the cache; this
// call's own keys come from qkv, since other blocks are writing them to the cache meanwhile.
template <int D>
__global__ void __launch_bounds__(256) attention(const float* qkv, float* k_cache, float* v_cache,
                                                 const long long* positions, float* out, int H,
                                                 int C, float scale) {
    constexpr int E = D >= 32 ? D / 32 : 1;
    __shared__ float warp_max_[8], warp_sum_[8], warp_acc[8][D];
    const int h = blockIdx.x, t = blockIdx.y, d = H * D, warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const long long p0 = positions[0], pos = positions[t];
    const float* row = qkv + (long long)t * 3 * d;
    const bool active = lane * E < D;  // lanes past D hold nothing (D < 32)
    for (int i = threadIdx.x; i < D; i += blockDim.x) {
        k_cache[((long long)h * C + pos) * D + i] = row[d + h * D + i];
        v_cache[((long long)h * C + pos) * D + i] = row[2 * d + h * D + i];
    }
    float q[E], acc[E];
#pragma unroll
    for (int e = 0; e < E; ++e) {
        q[e] = active ? row[h * D + lane * E + e] * scale : 0.0f;  // scaling q, as model.attention
        acc[e] = 0.0f;
    }
    float best = -3.0e38f, total = 0.0f;
#pragma unroll 4
    for (long long j = warp; j <= pos; j += 8) {  // keys 0..pos: the causal mask
        const float* k = j < p0 ? k_cache + ((long long)h * C + j) * D
                                : qkv + (j - p0) * 3 * d + d + h * D;
        const float* v = j < p0 ? v_cache + ((long long)h * C + j) * D
                                : qkv + (j - p0) * 3 * d + 2 * d + h * D;
        float s = 0.0f, vj[E];
#pragma unroll
        for (int e = 0; e < E; ++e) {
            s += active ? q[e] * k[lane * E + e] : 0.0f;
            vj[e] = active ? v[lane * E + e] : 0.0f;
        }
        s = warp_sum(s);
        const float grown = fmaxf(best, s);
        const float shrink = expf(best - grown), weight = expf(s - grown);
        total = total * shrink + weight;
#pragma unroll
        for (int e = 0; e < E; ++e) acc[e] = acc[e] * shrink + weight * vj[e];
        best = grown;
    }
    if (lane == 0) {
        warp_max_[warp] = best;
        warp_sum_[warp] = total;
    }
#pragma unroll
    for (int e = 0; e < E; ++e)
        if (active) warp_acc[warp][lane * E + e] = acc[e];
    __syncthreads();
    if (threadIdx.x < D) {  // merge the 8 running softmaxes (a warp with no keys has total 0)
        float m = -3.0e38f;
        for (int w = 0; w < 8; ++w) m = fmaxf(m, warp_max_[w]);
        float sum = 0.0f, value = 0.0f;
        for (int w = 0; w < 8; ++w) {
            const float f = warp_sum_[w] > 0.0f ? expf(warp_max_[w] - m) : 0.0f;
            sum += warp_sum_[w] * f;
            value += warp_acc[w][threadIdx.x] * f;
        }
        out[(long long)t * d + h * D + threadIdx.x] = value / sum;
    }
}
