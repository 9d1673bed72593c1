/*
 * st_bitnet CPU kernel: y = (int8 x) @ (ternary W)^T rescaled, bit-exact with
 * st_bitnet.bitlinear.ternary_linear_reference.
 *
 * Plain C (no torch headers) so it builds in about a second with the system compiler; Python loads it
 * through ctypes. One source, the instruction set is picked at compile time from the compiler's macros
 * (built with -march=native, or forced with -mavx2 / -DST_FORCE_SCALAR):
 *   AVX-512 VNNI  : vpdpbusd, 16 outputs per zmm, tile 32 outputs x 8 tokens.
 *   AVX2          : vpmaddubsw accumulated in int16, widened every 32 steps, tile 16 outputs x 4 tokens.
 *   NEON dotprod  : sdot by lane, tile 16 outputs x 4 tokens.
 *   scalar        : portable C.
 *
 * Weight layout "tile16" (built once per layer, in Python: st_bitnet.ops.layouts.pack_tile16):
 *   uint8 [ceil(N/16)][ceil(K/16)][64]. Row block b (outputs 16b..16b+15), K group g (k = 16g..16g+15):
 *   byte o*4+kk holds, in bits 2s..2s+1, code = w + 1 in {0,1,2} of output 16b+o at k = 16g + 4s + kk.
 *   So shifting the 64 bytes right by 2s and masking with 3 gives, for "K step" s, 16 outputs x 4
 *   consecutive k: exactly the operand of one vpdpbusd (int32 lane o = output o), or of two
 *   vpmaddubsw+vpmaddwd (AVX2, 8 outputs per ymm). Activations are broadcast 4 bytes at a time, so
 *   SIMD lanes run over outputs and no horizontal reduction is ever needed.
 *
 * Because codes are w + 1 (unsigned, as vpmaddubsw / vpdpbusd need), the kernel computes
 *   sum_k code * x = sum_k w * x + sum_k x   and subtracts sum_k x (computed while quantizing).
 *
 * Overflow bounds. x_q in [-128, 127] (clamp), code in {0, 1, 2} (code 3 is rejected in Python).
 *   vpmaddubsw int16 lane = c0*x0 + c1*x1, |.| <= 2*2*128 = 512 (no saturation). AVX2 adds 32 of them
 *   in int16 before widening: |.| <= 32*512 = 16384 < 32767. int32 totals: |.| <= 2*128*K, and Python
 *   rejects K >= 2^22, so |.| < 2^31. The integer result is exact; (float)acc equals the reference's
 *   float32 accumulator (exact below 2^24, same round-to-nearest-even above).
 *
 * Float arithmetic mirrors torch exactly (compile with -ffp-contract=off, never -ffast-math):
 *   absmax = max|x| (exact), clamp at 1e-5f; x_scale = (1.0f / absmax) * 127.0f   (torch evaluates the
 *   Python expression 127.0 / t as t.reciprocal() * 127); q = clamp(nearbyint(x * x_scale), -128, 127);
 *   y = (float)acc / (weight_scale * x_scale) [+ bias]   (division, not a reciprocal multiply).
 *
 * Non-finite rows: a row holding NaN or +-inf (after the optional norm) gets x_scale = NaN and x_q = 0, so
 * every output of that token is NaN, as in the reference (whose NaN x_scale, or inf * 0 = NaN, poisons the
 * row). max() alone would drop a NaN, so the absmax pass also tracks "some |x| > FLT_MAX or unordered".
 *
 * Optionally BitLinear's RMSNorm is fused into the quantization pass (x -> w_norm * (x * rsqrt(mean(x^2) + eps)),
 * see "Fused RMSNorm" below), bit-exact with st_bitnet.bitlinear.BitRMSNorm followed by the reference.
 *
 * Built with -DST_WITH_AMX (and -mamx-tile -mamx-int8 on an AVX-512 VNNI target), the library also exports an
 * AMX path (st_ternary_linear_amx_f32, see "AMX" at the end) that multiplies int8-resident weights with the
 * tile instruction TDPBSSD; the quantization and the epilogue are the ones above, so its results are the same.
 */
#include <float.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#ifdef _OPENMP
#include <omp.h>
#endif

#if !defined(ST_FORCE_SCALAR) && defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__) && \
    defined(__AVX512VNNI__)
#define ST_ISA_AVX512VNNI 1
#define ST_ISA_NAME "avx512vnni"
#define ST_TILE_T 8
#include <immintrin.h>
#elif !defined(ST_FORCE_SCALAR) && defined(__AVX2__)
#define ST_ISA_AVX2 1
#define ST_ISA_NAME "avx2"
#define ST_TILE_T 4
#include <immintrin.h>
#elif !defined(ST_FORCE_SCALAR) && defined(__aarch64__) && defined(__ARM_FEATURE_DOTPROD)
#define ST_ISA_NEON_DOT 1
#define ST_ISA_NAME "neon-dotprod"
#define ST_TILE_T 4
#include <arm_neon.h>
#else
#define ST_ISA_SCALAR 1
#define ST_ISA_NAME "scalar"
#define ST_TILE_T 4
#endif

#define ST_ALWAYS_INLINE static inline __attribute__((always_inline))
#define ST_ABI_VERSION 2

/* Work split for the threads: blocks of tokens x blocks of outputs. */
#define ST_BLOCK_M 64
#define ST_BLOCK_N 64

const char *st_isa(void) { return ST_ISA_NAME; }
int st_abi_version(void) { return ST_ABI_VERSION; }
int st_has_openmp(void) {
#ifdef _OPENMP
    return 1;
#else
    return 0;
#endif
}

static inline int32_t load_i32(const int8_t *p) {
    int32_t v;
    memcpy(&v, p, 4);
    return v;
}

/* ------------------------------------------------------------------------------------------------ */
/* Fused RMSNorm (BitRMSNorm = transformers' LlamaRMSNorm arithmetic, float32):                      */
/*   var = sum(x*x) / K;  r = 1 / sqrt(var + eps);  xn[k] = w[k] * (x[k] * r)                        */
/* torch sums x.pow(2) in a fixed order (ATen's cascade_sum, aten/src/ATen/native/cpu/SumKernel.cpp: */
/* vectorized_inner_sum -> row_sum -> multi_row_sum, float accumulators, Vectorized<float> of VW       */
/* lanes). torch_sumsq replays that order lane by lane, so var is bit-identical to                    */
/* x.pow(2).mean(-1). Python passes VW from torch's CPU capability and checks the result against     */
/* torch at load time; when it cannot (unknown capability), it passes var computed by torch instead. */
/* ------------------------------------------------------------------------------------------------ */
#define ST_MAX_VW 16

static int64_t ceil_log2(int64_t x) { /* ATen's utils::CeilLog2 */
    if (x <= 2) return 1;
    int64_t b = 0;
    uint64_t v = (uint64_t)(x - 1);
    while (v) {
        ++b;
        v >>= 1;
    }
    return b;
}

/* row_sum(x*x) over nvec vectors of L lanes (multi_row_sum with 4 columns, 4 cascade levels). */
ST_ALWAYS_INLINE void sumsq_row_sum(const float *x, int64_t nvec, const int L, float *out) {
    float acc[4][4][ST_MAX_VW];
    memset(acc, 0, sizeof(acc));
    const int64_t size = nvec / 4;
    int64_t lp = ceil_log2(size) / 4;
    if (lp < 4) lp = 4;
    const int64_t step = (int64_t)1 << lp, mask = step - 1;
    int64_t i = 0;
    while (i + step <= size) {
        for (int64_t j = 0; j < step; ++j, ++i)
            for (int c = 0; c < 4; ++c) {
                const float *v = x + (i * 4 + c) * L;
                for (int l = 0; l < L; ++l) acc[0][c][l] += v[l] * v[l];
            }
        for (int lev = 1; lev < 4; ++lev) {
            for (int c = 0; c < 4; ++c)
                for (int l = 0; l < L; ++l) {
                    acc[lev][c][l] += acc[lev - 1][c][l];
                    acc[lev - 1][c][l] = 0.0f;
                }
            if ((i & (mask << (lev * lp))) != 0) break;
        }
    }
    for (; i < size; ++i)
        for (int c = 0; c < 4; ++c) {
            const float *v = x + (i * 4 + c) * L;
            for (int l = 0; l < L; ++l) acc[0][c][l] += v[l] * v[l];
        }
    for (int lev = 1; lev < 4; ++lev)
        for (int c = 0; c < 4; ++c)
            for (int l = 0; l < L; ++l) acc[0][c][l] += acc[lev][c][l];
    for (int64_t v = size * 4; v < nvec; ++v)
        for (int l = 0; l < L; ++l) acc[0][0][l] += x[v * L + l] * x[v * L + l];
    for (int c = 1; c < 4; ++c)
        for (int l = 0; l < L; ++l) acc[0][0][l] += acc[0][c][l];
    for (int l = 0; l < L; ++l) out[l] = acc[0][0][l];
}

static float torch_sumsq(const float *x, int64_t K, int VW) {
    float part[ST_MAX_VW];
    if (K < VW) { /* scalar_inner_sum */
        sumsq_row_sum(x, K, 1, part);
        return part[0];
    }
    const int64_t nvec = K / VW; /* vectorized_inner_sum */
    /* constant lane counts let the compiler keep the lanes in one SIMD register (lane-wise IEEE ops,
       no contraction: the same roundings as the scalar loop) */
    switch (VW) {
        case 8: sumsq_row_sum(x, nvec, 8, part); break;
        case 16: sumsq_row_sum(x, nvec, 16, part); break;
        case 4: sumsq_row_sum(x, nvec, 4, part); break;
        default: sumsq_row_sum(x, nvec, VW, part); break;
    }
    float acc = 0.0f;
    for (int64_t k = nvec * VW; k < K; ++k) acc += x[k] * x[k];
    for (int l = 0; l < VW; ++l) acc += part[l];
    return acc;
}

/* 1 / sqrt(mean(x*x) + eps), as torch.rsqrt(x.pow(2).mean(-1) + eps). var: torch's value or NULL. */
ST_ALWAYS_INLINE float row_rstd(const float *x, int64_t K, int VW, const float *var, float eps) {
    const float v = var ? *var : torch_sumsq(x, K, VW) / (float)K;
    return 1.0f / sqrtf(v + eps);
}

/* Per-row normalization handed to quantize_row: x[k] -> nw[k] * (x[k] * r) when nw != NULL. */
typedef struct {
    const float *nw;
    float r;
} st_norm;

/* ------------------------------------------------------------------------------------------------ */
/* Activation quantization (one row): xq[0:Kp] (zero padded), x_scale, sum(xq).                       */
/* ------------------------------------------------------------------------------------------------ */
ST_ALWAYS_INLINE float row_scale(float amax) {
    amax = amax < 1e-5f ? 1e-5f : amax;
    float r = 1.0f / amax;
    return r * 127.0f;
}

/* A row holding NaN or +-inf: all codes 0 and x_scale NaN, so every output of the row is NaN. */
static void nonfinite_row(int64_t Kp, int8_t *q, float *xs, int32_t *xsum) {
    memset(q, 0, (size_t)Kp);
    *xs = NAN;
    *xsum = 0;
}

/* The value quantize_row reads at k: x[k], or the normalized nw[k] * (x[k] * r). */
ST_ALWAYS_INLINE float norm_value(const float *x, int64_t k, const st_norm *nm, const int has_norm) {
    return has_norm ? nm->nw[k] * (x[k] * nm->r) : x[k];
}

ST_ALWAYS_INLINE void quantize_row_scalar_impl(const float *x, int64_t K, int64_t Kp, const st_norm *nm,
                                               const int has_norm, int8_t *q, float *xs, int32_t *xsum) {
    float amax = 0.0f;
    int bad = 0;
    for (int64_t k = 0; k < K; ++k) {
        float a = fabsf(norm_value(x, k, nm, has_norm));
        bad |= !(a <= FLT_MAX); /* NaN or inf */
        amax = a > amax ? a : amax;
    }
    if (bad) {
        nonfinite_row(Kp, q, xs, xsum);
        return;
    }
    const float s = row_scale(amax);
    int32_t sum = 0;
    for (int64_t k = 0; k < K; ++k) {
        float v = nearbyintf(norm_value(x, k, nm, has_norm) * s);
        v = v < -128.0f ? -128.0f : (v > 127.0f ? 127.0f : v);
        q[k] = (int8_t)v;
        sum += q[k];
    }
    for (int64_t k = K; k < Kp; ++k) q[k] = 0;
    *xs = s;
    *xsum = sum;
}

#if defined(ST_ISA_AVX512VNNI)
ST_ALWAYS_INLINE __m512 load_normed16(const float *x, int64_t k, __mmask16 m, const st_norm *nm,
                                      const int has_norm) {
    const __m512 v = _mm512_maskz_loadu_ps(m, x + k);
    if (!has_norm) return v;
    /* maskz: lanes past K stay 0 even if r is inf */
    return _mm512_maskz_mul_ps(m, _mm512_maskz_loadu_ps(m, nm->nw + k), _mm512_mul_ps(v, _mm512_set1_ps(nm->r)));
}

ST_ALWAYS_INLINE void quantize_row_impl(const float *x, int64_t K, int64_t Kp, const st_norm *nm, const int has_norm,
                                        int8_t *q, float *xs, int32_t *xsum) {
    __m512 vmax = _mm512_setzero_ps();
    const __m512 fmax = _mm512_set1_ps(FLT_MAX);
    __mmask16 bad = 0;
    for (int64_t k = 0; k < K; k += 16) {
        const __mmask16 m = K - k >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (K - k)) - 1u);
        const __m512 a = _mm512_abs_ps(load_normed16(x, k, m, nm, has_norm));
        bad |= _mm512_cmp_ps_mask(a, fmax, _CMP_NLE_UQ); /* NaN or inf */
        vmax = _mm512_max_ps(vmax, a);
    }
    if (bad) {
        nonfinite_row(Kp, q, xs, xsum);
        return;
    }
    const float s = row_scale(_mm512_reduce_max_ps(vmax));
    const __m512 vs = _mm512_set1_ps(s), lo = _mm512_set1_ps(-128.0f), hi = _mm512_set1_ps(127.0f);
    __m512i vsum = _mm512_setzero_si512();
    for (int64_t k = 0; k < Kp; k += 16) { /* Kp is a multiple of 16; masked-off lanes quantize to 0 */
        const int64_t left = K - k;
        const __mmask16 m = left >= 16 ? (__mmask16)0xFFFF : (left <= 0 ? 0 : (__mmask16)((1u << left) - 1u));
        __m512 v = _mm512_mul_ps(load_normed16(x, k, m, nm, has_norm), vs);
        v = _mm512_roundscale_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        v = _mm512_min_ps(_mm512_max_ps(v, lo), hi);
        const __m512i i = _mm512_cvtps_epi32(v);
        vsum = _mm512_add_epi32(vsum, i);
        _mm_storeu_si128((__m128i *)(q + k), _mm512_cvtsepi32_epi8(i));
    }
    *xs = s;
    *xsum = _mm512_reduce_add_epi32(vsum);
}
#elif defined(ST_ISA_AVX2)
ST_ALWAYS_INLINE __m256 load_normed8(const float *x, int64_t k, const st_norm *nm, const int has_norm) {
    const __m256 v = _mm256_loadu_ps(x + k);
    if (!has_norm) return v;
    return _mm256_mul_ps(_mm256_loadu_ps(nm->nw + k), _mm256_mul_ps(v, _mm256_set1_ps(nm->r)));
}

ST_ALWAYS_INLINE void quantize_row_impl(const float *x, int64_t K, int64_t Kp, const st_norm *nm, const int has_norm,
                                        int8_t *q, float *xs, int32_t *xsum) {
    const __m256 sign = _mm256_set1_ps(-0.0f);
    const __m256 fmax = _mm256_set1_ps(FLT_MAX);
    __m256 vmax = _mm256_setzero_ps(), vbad = _mm256_setzero_ps();
    int64_t k = 0;
    for (; k + 8 <= K; k += 8) {
        const __m256 a = _mm256_andnot_ps(sign, load_normed8(x, k, nm, has_norm));
        vbad = _mm256_or_ps(vbad, _mm256_cmp_ps(a, fmax, _CMP_NLE_UQ)); /* NaN or inf */
        vmax = _mm256_max_ps(vmax, a);
    }
    float lanes[8];
    _mm256_storeu_ps(lanes, vmax);
    float amax = 0.0f;
    int bad = _mm256_movemask_ps(vbad) != 0;
    for (int i = 0; i < 8; ++i) amax = lanes[i] > amax ? lanes[i] : amax;
    for (; k < K; ++k) {
        float a = fabsf(norm_value(x, k, nm, has_norm));
        bad |= !(a <= FLT_MAX);
        amax = a > amax ? a : amax;
    }
    if (bad) {
        nonfinite_row(Kp, q, xs, xsum);
        return;
    }
    const float s = row_scale(amax);
    const __m256 vs = _mm256_set1_ps(s), lo = _mm256_set1_ps(-128.0f), hi = _mm256_set1_ps(127.0f);
    const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
    const __m256i ones8 = _mm256_set1_epi8(1), ones16 = _mm256_set1_epi16(1);
    __m256i vsum = _mm256_setzero_si256();
    for (k = 0; k + 32 <= K; k += 32) {
        __m256i i32[4];
        for (int j = 0; j < 4; ++j) {
            __m256 v = _mm256_mul_ps(load_normed8(x, k + 8 * j, nm, has_norm), vs);
            v = _mm256_round_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
            v = _mm256_min_ps(_mm256_max_ps(v, lo), hi);
            i32[j] = _mm256_cvtps_epi32(v);
        }
        const __m256i a = _mm256_packs_epi32(i32[0], i32[1]);
        const __m256i b = _mm256_packs_epi32(i32[2], i32[3]);
        const __m256i c = _mm256_permutevar8x32_epi32(_mm256_packs_epi16(a, b), order);
        _mm256_storeu_si256((__m256i *)(q + k), c);
        vsum = _mm256_add_epi32(vsum, _mm256_madd_epi16(_mm256_maddubs_epi16(ones8, c), ones16));
    }
    int32_t parts[8];
    _mm256_storeu_si256((__m256i *)parts, vsum);
    int32_t sum = 0;
    for (int i = 0; i < 8; ++i) sum += parts[i];
    for (; k < K; ++k) {
        float v = nearbyintf(norm_value(x, k, nm, has_norm) * s);
        v = v < -128.0f ? -128.0f : (v > 127.0f ? 127.0f : v);
        q[k] = (int8_t)v;
        sum += q[k];
    }
    for (; k < Kp; ++k) q[k] = 0;
    *xs = s;
    *xsum = sum;
}
#else
ST_ALWAYS_INLINE void quantize_row_impl(const float *x, int64_t K, int64_t Kp, const st_norm *nm, const int has_norm,
                                        int8_t *q, float *xs, int32_t *xsum) {
    quantize_row_scalar_impl(x, K, Kp, nm, has_norm, q, xs, xsum);
}
#endif

/* One row: optional fused RMSNorm (nw != NULL), then quantization. var: torch's mean(x*x) or NULL. */
static void quantize_row(const float *x, int64_t K, int64_t Kp, const float *nw, float eps, int VW, const float *var,
                         int8_t *q, float *xs, int32_t *xsum) {
    if (nw) {
        const st_norm nm = {nw, row_rstd(x, K, VW, var, eps)};
        quantize_row_impl(x, K, Kp, &nm, 1, q, xs, xsum);
    } else {
        quantize_row_impl(x, K, Kp, NULL, 0, q, xs, xsum);
    }
}

/* ------------------------------------------------------------------------------------------------ */
/* Epilogue: y[n] = (float)(acc - xsum) / (ws * xs) (+ bias[n]) for up to 16 outputs of one token.    */
/* ------------------------------------------------------------------------------------------------ */
static inline void store_outputs(const int32_t *acc, int count, int32_t xsum, float denom, const float *bias,
                                 float *y) {
    for (int o = 0; o < count; ++o) {
        float v = (float)(acc[o] - xsum) / denom;
        if (bias) v = v + bias[o];
        y[o] = v;
    }
}

/* ------------------------------------------------------------------------------------------------ */
/* Micro-kernels: R row blocks (16 outputs each) x T tokens, over all K groups.                     */
/*   w: tile16 blob at row block b0 (row block stride wstride bytes); x: T rows of xq (stride Kp).   */
/* ------------------------------------------------------------------------------------------------ */
typedef struct {
    const uint8_t *w; /* blob */
    const int8_t *xq;
    const float *xs;
    const int32_t *xsum;
    const float *bias;
    float *y;
    int64_t M, N, Kp, Kg, ldy;
    float ws;
} st_args;

#if defined(ST_ISA_AVX512VNNI)
ST_ALWAYS_INLINE void micro(const st_args *a, int64_t b0, int64_t m0, const int R, const int T) {
    const int64_t wstride = a->Kg * 64;
    const uint8_t *wb = a->w + b0 * wstride;
    const int8_t *xr = a->xq + m0 * a->Kp;
    const __m512i m3 = _mm512_set1_epi8(3);
    __m512i acc[2][8];
#pragma GCC unroll 2
    for (int r = 0; r < R; ++r)
#pragma GCC unroll 8
        for (int t = 0; t < T; ++t) acc[r][t] = _mm512_setzero_si512();
    for (int64_t g = 0; g < a->Kg; ++g) {
        __m512i p[2];
#pragma GCC unroll 2
        for (int r = 0; r < R; ++r) p[r] = _mm512_loadu_si512((const void *)(wb + r * wstride + g * 64));
        const int8_t *xg = xr + g * 16;
#pragma GCC unroll 4
        for (int s = 0; s < 4; ++s) {
            __m512i w[2];
#pragma GCC unroll 2
            for (int r = 0; r < R; ++r) w[r] = _mm512_and_si512(_mm512_srli_epi16(p[r], 2 * s), m3);
#pragma GCC unroll 8
            for (int t = 0; t < T; ++t) {
                const __m512i xb = _mm512_set1_epi32(load_i32(xg + t * a->Kp + 4 * s));
#pragma GCC unroll 2
                for (int r = 0; r < R; ++r) acc[r][t] = _mm512_dpbusd_epi32(acc[r][t], w[r], xb);
            }
        }
    }
#pragma GCC unroll 8
    for (int t = 0; t < T; ++t) {
        const int64_t m = m0 + t;
        const __m512 denom = _mm512_set1_ps(a->ws * a->xs[m]);
        const __m512i xsum = _mm512_set1_epi32(a->xsum[m]);
#pragma GCC unroll 2
        for (int r = 0; r < R; ++r) {
            const int64_t n = (b0 + r) * 16;
            const int64_t left = a->N - n;
            if (left <= 0) continue;
            const __mmask16 mk = left >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << left) - 1u);
            __m512 v = _mm512_div_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(acc[r][t], xsum)), denom);
            if (a->bias) v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(mk, a->bias + n));
            _mm512_mask_storeu_ps(a->y + m * a->ldy + n, mk, v);
        }
    }
}
#elif defined(ST_ISA_AVX2)
/* Here R counts ymm halves: one 16-output row block = 2 halves (bytes 0-31: outputs 0-7, 32-63: 8-15). */
ST_ALWAYS_INLINE void micro(const st_args *a, int64_t b0, int64_t m0, const int R, const int T) {
    (void)R; /* always one row block (2 halves) on AVX2 */
    const uint8_t *wb = a->w + b0 * a->Kg * 64;
    const int8_t *xr = a->xq + m0 * a->Kp;
    const __m256i m3 = _mm256_set1_epi8(3), ones16 = _mm256_set1_epi16(1);
    __m256i acc16[2][4], acc32[2][4];
#pragma GCC unroll 2
    for (int h = 0; h < 2; ++h)
#pragma GCC unroll 4
        for (int t = 0; t < T; ++t) acc16[h][t] = acc32[h][t] = _mm256_setzero_si256();
    int64_t g = 0;
    while (g < a->Kg) {
        /* 8 groups = 32 vpmaddubsw per int16 accumulator before widening: |sum| <= 32 * 512 */
        const int64_t gend = g + 8 < a->Kg ? g + 8 : a->Kg;
        for (; g < gend; ++g) {
            const __m256i p0 = _mm256_loadu_si256((const __m256i *)(wb + g * 64));
            const __m256i p1 = _mm256_loadu_si256((const __m256i *)(wb + g * 64 + 32));
            const int8_t *xg = xr + g * 16;
#pragma GCC unroll 4
            for (int s = 0; s < 4; ++s) {
                const __m256i w0 = _mm256_and_si256(_mm256_srli_epi16(p0, 2 * s), m3);
                const __m256i w1 = _mm256_and_si256(_mm256_srli_epi16(p1, 2 * s), m3);
#pragma GCC unroll 4
                for (int t = 0; t < T; ++t) {
                    const __m256i xb = _mm256_set1_epi32(load_i32(xg + t * a->Kp + 4 * s));
                    acc16[0][t] = _mm256_add_epi16(acc16[0][t], _mm256_maddubs_epi16(w0, xb));
                    acc16[1][t] = _mm256_add_epi16(acc16[1][t], _mm256_maddubs_epi16(w1, xb));
                }
            }
        }
#pragma GCC unroll 2
        for (int h = 0; h < 2; ++h)
#pragma GCC unroll 4
            for (int t = 0; t < T; ++t) {
                acc32[h][t] = _mm256_add_epi32(acc32[h][t], _mm256_madd_epi16(acc16[h][t], ones16));
                acc16[h][t] = _mm256_setzero_si256();
            }
    }
#pragma GCC unroll 4
    for (int t = 0; t < T; ++t) {
        const int64_t m = m0 + t;
        const float denom_s = a->ws * a->xs[m];
        const __m256 denom = _mm256_set1_ps(denom_s);
        const __m256i xsum = _mm256_set1_epi32(a->xsum[m]);
#pragma GCC unroll 2
        for (int h = 0; h < 2; ++h) {
            const int64_t n = b0 * 16 + h * 8;
            const int64_t left = a->N - n;
            if (left <= 0) continue;
            __m256 v = _mm256_div_ps(_mm256_cvtepi32_ps(_mm256_sub_epi32(acc32[h][t], xsum)), denom);
            float *yo = a->y + m * a->ldy + n;
            if (left >= 8) {
                if (a->bias) v = _mm256_add_ps(v, _mm256_loadu_ps(a->bias + n));
                _mm256_storeu_ps(yo, v);
            } else {
                float tmp[8];
                _mm256_storeu_ps(tmp, v);
                for (int o = 0; o < left; ++o) yo[o] = a->bias ? tmp[o] + a->bias[n + o] : tmp[o];
            }
        }
    }
}
#elif defined(ST_ISA_NEON_DOT)
ST_ALWAYS_INLINE uint8x16_t neon_codes(uint8x16_t p, const int s) {
    const uint8x16_t m3 = vdupq_n_u8(3);
    switch (s) {
        case 0: return vandq_u8(p, m3);
        case 1: return vandq_u8(vshrq_n_u8(p, 2), m3);
        case 2: return vandq_u8(vshrq_n_u8(p, 4), m3);
        default: return vshrq_n_u8(p, 6);
    }
}
ST_ALWAYS_INLINE void micro(const st_args *a, int64_t b0, int64_t m0, const int R, const int T) {
    (void)R; /* one row block = 4 q registers of 4 outputs */
    const uint8_t *wb = a->w + b0 * a->Kg * 64;
    const int8_t *xr = a->xq + m0 * a->Kp;
    int32x4_t acc[4][4];
    for (int h = 0; h < 4; ++h)
        for (int t = 0; t < T; ++t) acc[h][t] = vdupq_n_s32(0);
    for (int64_t g = 0; g < a->Kg; ++g) {
        uint8x16_t p[4];
        for (int h = 0; h < 4; ++h) p[h] = vld1q_u8(wb + g * 64 + 16 * h);
        const int8_t *xg = xr + g * 16;
        for (int s = 0; s < 4; ++s) {
            int8x16_t w[4];
            for (int h = 0; h < 4; ++h) w[h] = vreinterpretq_s8_u8(neon_codes(p[h], s));
            for (int t = 0; t < T; ++t) {
                /* codes are 0..2, so the signed dot product is the same as the unsigned one */
                const int8x16_t xb = vreinterpretq_s8_s32(vdupq_n_s32(load_i32(xg + t * a->Kp + 4 * s)));
                for (int h = 0; h < 4; ++h) acc[h][t] = vdotq_s32(acc[h][t], w[h], xb);
            }
        }
    }
    for (int t = 0; t < T; ++t) {
        const int64_t m = m0 + t;
        const float denom = a->ws * a->xs[m];
        for (int h = 0; h < 4; ++h) {
            const int64_t n = b0 * 16 + h * 4;
            const int64_t left = a->N - n;
            if (left <= 0) continue;
            int32_t lanes[4];
            vst1q_s32(lanes, acc[h][t]);
            store_outputs(lanes, left < 4 ? (int)left : 4, a->xsum[m], denom, a->bias ? a->bias + n : NULL,
                          a->y + m * a->ldy + n);
        }
    }
}
#else
ST_ALWAYS_INLINE void micro(const st_args *a, int64_t b0, int64_t m0, const int R, const int T) {
    (void)R;
    const uint8_t *wb = a->w + b0 * a->Kg * 64;
    for (int t = 0; t < T; ++t) {
        const int64_t m = m0 + t;
        const int8_t *xr = a->xq + m * a->Kp;
        int32_t acc[16] = {0};
        for (int64_t g = 0; g < a->Kg; ++g) {
            const uint8_t *blk = wb + g * 64;
            const int8_t *xg = xr + g * 16;
            for (int o = 0; o < 16; ++o)
                for (int s = 0; s < 4; ++s)
                    for (int kk = 0; kk < 4; ++kk) acc[o] += ((blk[o * 4 + kk] >> (2 * s)) & 3) * xg[4 * s + kk];
        }
        const int64_t n = b0 * 16;
        const int64_t left = a->N - n;
        store_outputs(acc, left < 16 ? (int)left : 16, a->xsum[m], a->ws * a->xs[m], a->bias ? a->bias + n : NULL,
                      a->y + m * a->ldy + n);
    }
}
#endif

/* Row blocks handled per micro-kernel call. */
#if defined(ST_ISA_AVX512VNNI)
#define ST_TILE_R 2
#else
#define ST_TILE_R 1
#endif

static void gemm_block(const st_args *a, int64_t mb0, int64_t mb1, int64_t bb0, int64_t bb1) {
    for (int64_t b = bb0; b < bb1; b += ST_TILE_R) {
        const int r = (b + ST_TILE_R <= bb1) ? ST_TILE_R : (int)(bb1 - b);
        int64_t m = mb0;
        for (; m + ST_TILE_T <= mb1; m += ST_TILE_T) {
            if (r == ST_TILE_R) micro(a, b, m, ST_TILE_R, ST_TILE_T);
            else micro(a, b, m, 1, ST_TILE_T);
        }
        /* token tail: 1 token at a time (small M or the last few rows) */
        for (; m < mb1; ++m) {
            if (r == ST_TILE_R) micro(a, b, m, ST_TILE_R, 1);
            else micro(a, b, m, 1, 1);
        }
    }
}

/*
 * x: fp32 (M, K), row stride ldx. w: tile16 blob (ceil(N/16), Kp/16, 64). bias: fp32 (N) or NULL.
 * nw: fp32 (K) RMSNorm weight, or NULL for no norm (x is then quantized as it is); eps: its epsilon;
 * vw: torch's Vectorized<float> width (the order of its sum), used when var is NULL; var: fp32 (M) =
 * x.pow(2).mean(-1) computed by torch, or NULL (computed here in torch's order).
 * y: fp32 (M, N), row stride ldy. xq: int8 scratch (M, Kp); xs: fp32 scratch (M); xsum: int32 scratch (M).
 * Returns 0 on success, a negative code on bad arguments.
 */
int st_ternary_linear_f32(const float *x, int64_t M, int64_t K, int64_t ldx, const float *nw, float eps, int vw,
                          const float *var, const uint8_t *w, int64_t N, int64_t Kp, float ws, const float *bias,
                          float *y, int64_t ldy, int8_t *xq, float *xs, int32_t *xsum, int nthreads) {
    if (M < 0 || K <= 0 || N <= 0 || Kp < K || Kp % 16 != 0 || ldx < K || ldy < N) return -1;
    if (nw && !var && (vw < 1 || vw > ST_MAX_VW)) return -2;
    if (M == 0) return 0;
    st_args a = {w, xq, xs, xsum, bias, y, M, N, Kp, Kp / 16, ldy, ws};
    const int64_t nblocks = (N + 15) / 16;
    const int64_t bb = ST_BLOCK_N / 16;
    const int64_t n_mb = (M + ST_BLOCK_M - 1) / ST_BLOCK_M, n_nb = (nblocks + bb - 1) / bb;
    const int64_t items = n_mb * n_nb;
#define ST_QUANTIZE(m) \
    quantize_row(x + (m) * ldx, K, Kp, nw, eps, vw, var ? var + (m) : NULL, xq + (m) * Kp, xs + (m), xsum + (m))
    if (nthreads < 1) nthreads = 1;
#ifdef _OPENMP
    /* tiny problems: threads cost more than they save */
    if ((double)M * (double)N * (double)K < 2.0e5) nthreads = 1;
    if (n_mb >= 2 * (int64_t)nthreads) {
        /* Many token blocks: each thread quantizes and multiplies its own rows, so the threads never wait
           for each other before the end (barriers are costly on a busy, oversubscribed machine). */
#pragma omp parallel num_threads(nthreads)
        {
            const int64_t nt = omp_get_num_threads(), tid = omp_get_thread_num();
            const int64_t mb0 = n_mb * tid / nt, mb1 = n_mb * (tid + 1) / nt;
            const int64_t m0 = mb0 * ST_BLOCK_M, m1 = mb1 * ST_BLOCK_M < M ? mb1 * ST_BLOCK_M : M;
            for (int64_t m = m0; m < m1; ++m) ST_QUANTIZE(m);
            for (int64_t mi = mb0; mi < mb1; ++mi) {
                const int64_t r0 = mi * ST_BLOCK_M, r1 = r0 + ST_BLOCK_M < M ? r0 + ST_BLOCK_M : M;
                for (int64_t ni = 0; ni < n_nb; ++ni) {
                    const int64_t b0 = ni * bb, b1 = b0 + bb < nblocks ? b0 + bb : nblocks;
                    gemm_block(&a, r0, r1, b0, b1);
                }
            }
        }
        return 0;
    }
#pragma omp parallel num_threads(nthreads)
#endif
    {
#ifdef _OPENMP
#pragma omp for schedule(static)
#endif
        for (int64_t m = 0; m < M; ++m) ST_QUANTIZE(m);
#ifdef _OPENMP
#pragma omp for schedule(static)
#endif
        for (int64_t it = 0; it < items; ++it) {
            const int64_t mi = it / n_nb, ni = it % n_nb;
            const int64_t m0 = mi * ST_BLOCK_M, m1 = m0 + ST_BLOCK_M < M ? m0 + ST_BLOCK_M : M;
            const int64_t b0 = ni * bb, b1 = b0 + bb < nblocks ? b0 + bb : nblocks;
            gemm_block(&a, m0, m1, b0, b1);
        }
    }
#undef ST_QUANTIZE
    return 0;
}

/* (Optional norm and) quantization alone: tests compare it with the PyTorch reference. */
int st_quantize_f32(const float *x, int64_t M, int64_t K, int64_t ldx, const float *nw, float eps, int vw,
                    const float *var, int64_t Kp, int8_t *xq, float *xs, int32_t *xsum) {
    if (M < 0 || K <= 0 || Kp < K || ldx < K) return -1;
    if (nw && !var && (vw < 1 || vw > ST_MAX_VW)) return -2;
    for (int64_t m = 0; m < M; ++m)
        quantize_row(x + m * ldx, K, Kp, nw, eps, vw, var ? var + m : NULL, xq + m * Kp, xs + m, xsum + m);
    return 0;
}

/* x.pow(2).mean(-1) per row in torch's summation order for Vectorized<float> width vw. */
int st_mean_sq_f32(const float *x, int64_t M, int64_t K, int64_t ldx, int vw, float *out) {
    if (M < 0 || K <= 0 || ldx < K || vw < 1 || vw > ST_MAX_VW) return -1;
    for (int64_t m = 0; m < M; ++m) out[m] = torch_sumsq(x + m * ldx, K, vw) / (float)K;
    return 0;
}

/* ------------------------------------------------------------------------------------------------ */
/* AMX (Intel Sapphire Rapids and later): TDPBSSD on 16 x 64-byte tiles.                             */
/*                                                                                                  */
/* Weight layout "amx64" (st_bitnet.ops.layouts.pack_amx64): int8 [ceil(N/16)][Kp/64][16][64] with   */
/* Kp = ceil(K/64) * 64. Block [b, g] is one B tile: row r, byte 4*o + i holds w (in {-1, 0, 1}) of  */
/* output 16b + o at input 64g + 4r + i, zero padded. The activations are the xq rows above, padded  */
/* to Kp with zeros and to a multiple of 16 rows. TDPBSSD adds, per (token, output), the products of  */
/* 4 consecutive signed bytes: acc = sum_k w * x_q exactly (|acc| <= 128 * K < 2^31), the value the  */
/* VNNI path gets as acc - xsum, so the same epilogue gives the same float.                         */
/* The tile registers need the kernel's permission (arch_prctl ARCH_REQ_XCOMP_PERM, once per process) */
/* and a tile configuration per thread. Register use: C tiles 0-3 (2 x 2 blocks of 16 x 16 int32),   */
/* A tiles 4-5 (16 tokens x 64 bytes), B tiles 6-7 (one 16-output block each).                      */
/* ------------------------------------------------------------------------------------------------ */
#if defined(ST_WITH_AMX)
#if !defined(ST_ISA_AVX512VNNI) || !defined(__AMX_TILE__) || !defined(__AMX_INT8__)
#error "the AMX build needs an AVX-512 VNNI target and -mamx-tile -mamx-int8"
#endif
#include <cpuid.h>
#include <sys/syscall.h>
long syscall(long number, ...); /* <unistd.h> declares it only outside strict -std=c11 */

#define ST_ARCH_GET_XCOMP_PERM 0x1022
#define ST_ARCH_REQ_XCOMP_PERM 0x1023
#define ST_XFEATURE_XTILEDATA 18
#define ST_AMX_PANEL_N 16 /* 16-output blocks per cache panel: 256 outputs x Kp bytes of weights */

/* 0 when this CPU has AMX-TILE and AMX-INT8 and the OS lets the process use the tile data; a negative
   code otherwise. Only CPUID and arch_prctl run here, so it is safe to call on any x86-64 CPU. */
int st_amx_init(void) {
    unsigned int eax, ebx, ecx, edx;
    if (!__get_cpuid_count(7, 0, &eax, &ebx, &ecx, &edx)) return -1;
    if (!(edx & (1u << 24)) || !(edx & (1u << 25))) return -2; /* AMX-TILE, AMX-INT8 */
    if (syscall(SYS_arch_prctl, ST_ARCH_REQ_XCOMP_PERM, ST_XFEATURE_XTILEDATA) != 0) return -3;
    unsigned long mask = 0;
    if (syscall(SYS_arch_prctl, ST_ARCH_GET_XCOMP_PERM, &mask) != 0) return -4;
    return (mask & (1ul << ST_XFEATURE_XTILEDATA)) ? 0 : -5;
}

typedef struct __attribute__((packed, aligned(64))) {
    uint8_t palette_id;
    uint8_t start_row;
    uint8_t reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
} st_tile_config;

static void amx_configure(void) {
    st_tile_config cfg;
    memset(&cfg, 0, sizeof(cfg));
    cfg.palette_id = 1;
    for (int t = 0; t < 8; ++t) {
        cfg.rows[t] = 16;
        cfg.colsb[t] = 64;
    }
    _tile_loadconfig(&cfg);
}

typedef struct {
    const int8_t *w; /* amx64 blob */
    const int8_t *xq; /* ceil(M/16)*16 rows of Kp bytes */
    const float *xs;
    const float *bias;
    float *y;
    int64_t M, N, Kp, Kb, ldy;
    float ws;
} st_amx_args;

/* y rows m0.. (at most 16, not past M), outputs n0..n0+15 (not past N), from one 16 x 16 int32 block. */
static void amx_epilogue(const st_amx_args *a, const int32_t *acc, int64_t m0, int64_t n0) {
    const int64_t left = a->N - n0;
    if (left <= 0) return;
    const __mmask16 mk = left >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << left) - 1u);
    const __m512 b = a->bias ? _mm512_maskz_loadu_ps(mk, a->bias + n0) : _mm512_setzero_ps();
    for (int t = 0; t < 16 && m0 + t < a->M; ++t) {
        const int64_t m = m0 + t;
        const __m512 denom = _mm512_set1_ps(a->ws * a->xs[m]);
        __m512 v = _mm512_div_ps(_mm512_cvtepi32_ps(_mm512_load_si512((const void *)(acc + 16 * t))), denom);
        if (a->bias) v = _mm512_add_ps(v, b);
        _mm512_mask_storeu_ps(a->y + m * a->ldy + n0, mk, v);
    }
}

/* MT x NT tiles of 16 x 16 outputs (MT, NT in {1, 2}): tokens m0.., output blocks nb0.. */
ST_ALWAYS_INLINE void amx_micro(const st_amx_args *a, int64_t m0, int64_t nb0, const int MT, const int NT) {
    const int8_t *xa = a->xq + m0 * a->Kp;
    const int8_t *wb = a->w + nb0 * a->Kb * 1024;
    const int64_t next_block = a->Kb * 1024;
    _tile_zero(0);
    if (NT == 2) _tile_zero(1);
    if (MT == 2) {
        _tile_zero(2);
        if (NT == 2) _tile_zero(3);
    }
    for (int64_t g = 0; g < a->Kb; ++g) {
        _tile_loadd(4, xa + g * 64, a->Kp);
        _tile_loadd(6, wb + g * 1024, 64);
        _tile_dpbssd(0, 4, 6);
        if (NT == 2) {
            _tile_loadd(7, wb + next_block + g * 1024, 64);
            _tile_dpbssd(1, 4, 7);
        }
        if (MT == 2) {
            _tile_loadd(5, xa + 16 * a->Kp + g * 64, a->Kp);
            _tile_dpbssd(2, 5, 6);
            if (NT == 2) _tile_dpbssd(3, 5, 7);
        }
    }
    int32_t acc[4][256] __attribute__((aligned(64)));
    _tile_stored(0, acc[0], 64);
    if (NT == 2) _tile_stored(1, acc[1], 64);
    if (MT == 2) {
        _tile_stored(2, acc[2], 64);
        if (NT == 2) _tile_stored(3, acc[3], 64);
    }
    for (int i = 0; i < MT; ++i)
        for (int j = 0; j < NT; ++j) amx_epilogue(a, acc[2 * i + j], m0 + 16 * i, (nb0 + j) * 16);
}

static void amx_panel(const st_amx_args *a, int64_t m0, int64_t mtiles, int64_t nb0, int64_t nb1) {
    const int MT = (m0 / 16 + 1 < mtiles) ? 2 : 1;
    int64_t b = nb0;
    if (MT == 2) {
        for (; b + 2 <= nb1; b += 2) amx_micro(a, m0, b, 2, 2);
        if (b < nb1) amx_micro(a, m0, b, 2, 1);
    } else {
        for (; b + 2 <= nb1; b += 2) amx_micro(a, m0, b, 1, 2);
        if (b < nb1) amx_micro(a, m0, b, 1, 1);
    }
}

/*
 * As st_ternary_linear_f32, with w an amx64 blob (ceil(N/16), Kp/64, 16, 64) and Kp a multiple of 64;
 * xq: int8 scratch of ceil(M/16)*16 rows of Kp bytes; xs: fp32 scratch (M). Call st_amx_init() first.
 */
int st_ternary_linear_amx_f32(const float *x, int64_t M, int64_t K, int64_t ldx, const float *nw, float eps, int vw,
                              const float *var, const int8_t *w, int64_t N, int64_t Kp, float ws, const float *bias,
                              float *y, int64_t ldy, int8_t *xq, float *xs, int nthreads) {
    if (M < 0 || K <= 0 || N <= 0 || Kp < K || Kp % 64 != 0 || ldx < K || ldy < N) return -1;
    if (nw && !var && (vw < 1 || vw > ST_MAX_VW)) return -2;
    if (M == 0) return 0;
    const int64_t mtiles = (M + 15) / 16, nblocks = (N + 15) / 16;
    memset(xq + M * Kp, 0, (size_t)((mtiles * 16 - M) * Kp)); /* padding rows: products discarded, kept finite */
    st_amx_args a = {w, xq, xs, bias, y, M, N, Kp, Kp / 64, ldy, ws};
    const int64_t mpanels = (mtiles + 1) / 2, npanels = (nblocks + ST_AMX_PANEL_N - 1) / ST_AMX_PANEL_N;
    const int64_t items = mpanels * npanels;
    if (nthreads < 1) nthreads = 1;
#ifdef _OPENMP
    if ((double)M * (double)N * (double)K < 2.0e5) nthreads = 1;
#pragma omp parallel num_threads(nthreads)
#endif
    {
#ifdef _OPENMP
#pragma omp for schedule(static)
#endif
        for (int64_t m = 0; m < M; ++m) {
            int32_t xsum;
            quantize_row(x + m * ldx, K, Kp, nw, eps, vw, var ? var + m : NULL, xq + m * Kp, xs + m, &xsum);
        }
        amx_configure();
        /* a weight panel (256 outputs) stays in L2 while the thread runs every token panel over it */
#ifdef _OPENMP
#pragma omp for schedule(static)
#endif
        for (int64_t it = 0; it < items; ++it) {
            const int64_t ni = it / mpanels, mi = it % mpanels;
            const int64_t nb0 = ni * ST_AMX_PANEL_N, nb1 = nb0 + ST_AMX_PANEL_N < nblocks ? nb0 + ST_AMX_PANEL_N : nblocks;
            amx_panel(&a, mi * 32, mtiles, nb0, nb1);
        }
        _tile_release();
    }
    return 0;
}
#endif /* ST_WITH_AMX */
