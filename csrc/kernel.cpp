// ropekit CPU rotary kernel: the SIMD math, plain C++17 (no torch headers).
//
// Compiled once per instruction-set level by setup.py (-DRK_LEVEL=default|avx2|avx512 with
// that level's -m flags); ops.cpp picks the level at load time from the CPU's features
// (ROPEKIT_CPU_CAPABILITY forces a lower one). Interface: kernel.h.
//
// Precision: loads widen to the compute type C (float32 for float32/bfloat16/float16,
// float64 for float64), y1 = x1*c - x2*s and y2 = x2*c + x1*s are computed in C with
// separately rounded products (-ffp-contract=off: the same bits with or without FMA
// hardware, at every level), then rounded once to the storage type (round-to-nearest-even
// for bf16 and fp16).
//
// In place (out == x) is safe: every block of pairs is fully loaded into local arrays
// before any of it is stored, and both lanes of a pair are in the same block.
#include <math.h>
#include <stdint.h>
#include <string.h>

#include <vector>
#if defined(__AVX2__) || defined(__AVX512F__)
#include <immintrin.h>
#define RK_HAS_NT 1
#else
#define RK_HAS_NT 0
#endif

#include "kernel.h"

#ifndef RK_LEVEL
#define RK_LEVEL default
#endif
#define RK_CAT2(a, b) a##b
#define RK_CAT(a, b) RK_CAT2(a, b)

typedef int64_t i64;

namespace RK_CAT(rk_, RK_LEVEL) {

typedef RkJob Job;
enum { MAXD = RK_MAXD };

// SIMD through GCC/clang vector extensions, so one source compiles for whatever
// -march=native offers: 64-byte vectors with AVX-512 (16 float lanes), else 32-byte (AVX2
// ymm, NEON/SSE register pairs). Intrinsics only for the dtype conversions.
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#define RK_VB 64
#else
#define RK_VB 32
#endif
typedef float vf __attribute__((vector_size(RK_VB)));
typedef double vd __attribute__((vector_size(RK_VB)));
typedef uint32_t vu __attribute__((vector_size(RK_VB)));
typedef uint16_t vh __attribute__((vector_size(RK_VB / 2)));
enum { NF = RK_VB / 4, ND = RK_VB / 8 };

static inline vf vload(const float* p) { vf v; memcpy(&v, p, sizeof v); return v; }
static inline vd vload(const double* p) { vd v; memcpy(&v, p, sizeof v); return v; }

// (x0 y0 x1 y1 ...) pairs <-> lanes a = (x0 x1 ...), b = (y0 y1 ...)
#if defined(__clang__) || (defined(__GNUC__) && __GNUC__ >= 12)
#define RK_SHUF(a, b, ...) __builtin_shufflevector(a, b, __VA_ARGS__)
#else
typedef int32_t vi32 __attribute__((vector_size(RK_VB)));
typedef int64_t vi64 __attribute__((vector_size(RK_VB)));
#endif
#if RK_VB == 64
#define RK_F_EVEN 0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30
#define RK_F_ODD 1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31
#define RK_F_LO 0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23
#define RK_F_HI 8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31
#define RK_D_EVEN 0, 2, 4, 6, 8, 10, 12, 14
#define RK_D_ODD 1, 3, 5, 7, 9, 11, 13, 15
#define RK_D_LO 0, 8, 1, 9, 2, 10, 3, 11
#define RK_D_HI 4, 12, 5, 13, 6, 14, 7, 15
#else
#define RK_F_EVEN 0, 2, 4, 6, 8, 10, 12, 14
#define RK_F_ODD 1, 3, 5, 7, 9, 11, 13, 15
#define RK_F_LO 0, 8, 1, 9, 2, 10, 3, 11
#define RK_F_HI 4, 12, 5, 13, 6, 14, 7, 15
#define RK_D_EVEN 0, 2, 4, 6
#define RK_D_ODD 1, 3, 5, 7
#define RK_D_LO 0, 4, 1, 5
#define RK_D_HI 2, 6, 3, 7
#endif
#ifdef RK_SHUF
static inline void deint(vf v0, vf v1, vf& a, vf& b) { a = RK_SHUF(v0, v1, RK_F_EVEN); b = RK_SHUF(v0, v1, RK_F_ODD); }
static inline void inter(vf a, vf b, vf& v0, vf& v1) { v0 = RK_SHUF(a, b, RK_F_LO); v1 = RK_SHUF(a, b, RK_F_HI); }
static inline void deint(vd v0, vd v1, vd& a, vd& b) { a = RK_SHUF(v0, v1, RK_D_EVEN); b = RK_SHUF(v0, v1, RK_D_ODD); }
static inline void inter(vd a, vd b, vd& v0, vd& v1) { v0 = RK_SHUF(a, b, RK_D_LO); v1 = RK_SHUF(a, b, RK_D_HI); }
#else  // GCC < 12
static inline void deint(vf v0, vf v1, vf& a, vf& b) {
    a = __builtin_shuffle(v0, v1, (vi32){RK_F_EVEN});
    b = __builtin_shuffle(v0, v1, (vi32){RK_F_ODD});
}
static inline void inter(vf a, vf b, vf& v0, vf& v1) {
    v0 = __builtin_shuffle(a, b, (vi32){RK_F_LO});
    v1 = __builtin_shuffle(a, b, (vi32){RK_F_HI});
}
static inline void deint(vd v0, vd v1, vd& a, vd& b) {
    a = __builtin_shuffle(v0, v1, (vi64){RK_D_EVEN});
    b = __builtin_shuffle(v0, v1, (vi64){RK_D_ODD});
}
static inline void inter(vd a, vd b, vd& v0, vd& v1) {
    v0 = __builtin_shuffle(a, b, (vi64){RK_D_LO});
    v1 = __builtin_shuffle(a, b, (vi64){RK_D_HI});
}
#endif

// Storage type S, compute type C, vector V of N compute lanes; vld widens, vst rounds.
struct F32 {
    typedef float S;
    typedef float C;
    typedef vf V;
    enum { N = NF };
    static inline V vld(const S* p) { return vload(p); }
    static inline void vst(S* p, V v) { memcpy(p, &v, sizeof v); }
#if RK_VB == 64
    static inline void vst_nt(S* p, V v) { _mm512_stream_ps(p, (__m512)v); }
#elif defined(__AVX__)
    static inline void vst_nt(S* p, V v) { _mm256_stream_ps(p, (__m256)v); }
#else
    static inline void vst_nt(S* p, V v) { vst(p, v); }
#endif
};
struct F64 {
    typedef double S;
    typedef double C;
    typedef vd V;
    enum { N = ND };
    static inline V vld(const S* p) { return vload(p); }
    static inline void vst(S* p, V v) { memcpy(p, &v, sizeof v); }
};

// bfloat16 <-> float32. Load: bf16 is the top half of a float32 (exact). Store: round to
// nearest even, u + 0x7FFF + (bit 16 of u), then the top half; NaN stays a quiet NaN
// (what torch's .to(torch.bfloat16) does).
struct BF16 {
    typedef uint16_t S;
    typedef float C;
    typedef vf V;
    enum { N = NF };
#if RK_VB == 64
    static inline V vld(const S* p) {
        return (V)_mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)p)), 16));
    }
#if defined(__AVX512BF16__)
    static inline __m256i pack(V f) { return (__m256i)_mm512_cvtneps_pbh((__m512)f); }  // hardware RNE, NaN -> qNaN
#else
    static inline __m256i pack(V f) {  // the rounding above on 16 lanes
        const __m512i u = _mm512_castps_si512((__m512)f);
        const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
        const __m512i r = _mm512_srli_epi32(_mm512_add_epi32(u, _mm512_add_epi32(odd, _mm512_set1_epi32(0x7FFF))), 16);
        const __m512i n = _mm512_or_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(0x40));
        const __mmask16 nan = _mm512_cmpgt_epu32_mask(_mm512_and_si512(u, _mm512_set1_epi32(0x7FFFFFFF)), _mm512_set1_epi32(0x7F800000));
        return _mm512_cvtepi32_epi16(_mm512_mask_blend_epi32(nan, r, n));
    }
#endif
    static inline void vst(S* p, V f) { _mm256_storeu_si256((__m256i*)p, pack(f)); }
    static inline void vst_nt(S* p, V f) { _mm256_stream_si256((__m256i*)p, pack(f)); }
#elif defined(__AVX2__)
    static inline V vld(const S* p) {
        return (V)_mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i*)p)), 16));
    }
    static inline __m128i pack(V f) {  // the rounding above on 8 lanes
        const __m256i u = _mm256_castps_si256((__m256)f);
        const __m256i odd = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
        __m256i r = _mm256_srli_epi32(_mm256_add_epi32(u, _mm256_add_epi32(odd, _mm256_set1_epi32(0x7FFF))), 16);
        const __m256i n = _mm256_or_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(0x40));
        const __m256i nan = _mm256_cmpgt_epi32(_mm256_and_si256(u, _mm256_set1_epi32(0x7FFFFFFF)), _mm256_set1_epi32(0x7F800000));
        r = _mm256_blendv_epi8(r, n, nan);
        // 8 x u32 (< 2^16) -> 8 x u16: pack within 128-bit lanes, then join the two halves
        return _mm256_castsi256_si128(_mm256_permute4x64_epi64(_mm256_packus_epi32(r, r), 0x08));
    }
    static inline void vst(S* p, V f) { _mm_storeu_si128((__m128i*)p, pack(f)); }
    static inline void vst_nt(S* p, V f) { _mm_stream_si128((__m128i*)p, pack(f)); }
#else
    static inline V vld(const S* p) {
        vh h;
        memcpy(&h, p, sizeof h);
        vu u = __builtin_convertvector(h, vu) << 16;
        V f;
        memcpy(&f, &u, sizeof f);
        return f;
    }
    static inline void vst(S* p, V f) {
        vu u;
        memcpy(&u, &f, sizeof u);
        vu r = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
        vu n = (u >> 16) | 0x40u;
        vu nan = (vu)((u & 0x7FFFFFFFu) > 0x7F800000u);  // all ones where NaN
        vu out = (nan & n) | (~nan & r);
        vh h = __builtin_convertvector(out, vh);
        memcpy(p, &h, sizeof h);
    }
    static inline void vst_nt(S* p, V f) { vst(p, f); }
#endif
};

template <typename T> struct IsBF16 { enum { value = 0 }; };
template <> struct IsBF16<BF16> { enum { value = 1 }; };

// float16: F16C conversions (one instruction each way, round to nearest even) where the
// CPU has them, else the compiler's _Float16; without either, float16 goes to eager.
#if defined(__F16C__) && defined(__AVX2__)
struct F16 {
    typedef uint16_t S;
    typedef float C;
    typedef vf V;
    enum { N = NF };
#if RK_VB == 64
    static inline V vld(const S* p) { return (V)_mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)p)); }
    static inline void vst(S* p, V f) {
        _mm256_storeu_si256((__m256i*)p, _mm512_cvtps_ph((__m512)f, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
    }
#else
    static inline V vld(const S* p) { return (V)_mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)p)); }
    static inline void vst(S* p, V f) {
        _mm_storeu_si128((__m128i*)p, _mm256_cvtps_ph((__m256)f, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
    }
#endif
};
#define ROPEKIT_HAS_F16 1
#elif defined(__FLT16_MAX__)
typedef _Float16 vhf __attribute__((vector_size(RK_VB / 2)));
struct F16 {
    typedef uint16_t S;  // the bits of a _Float16
    typedef float C;
    typedef vf V;
    enum { N = NF };
    static inline V vld(const S* p) {
        vhf h;
        memcpy(&h, p, sizeof h);
        return __builtin_convertvector(h, vf);
    }
    static inline void vst(S* p, V f) {
        vhf h = __builtin_convertvector(f, vhf);
        memcpy(p, &h, sizeof h);
    }
};
#define ROPEKIT_HAS_F16 1
#else
#define ROPEKIT_HAS_F16 0
#endif

// One row: r/2 pairs, N pairs per step. Each step loads both lanes of its pairs before
// storing them, so out == x is safe; steps touch disjoint pairs.
template <typename T, int LAYOUT, int NT>
static inline void st(typename T::S* p, typename T::V v) {
    if constexpr (NT != 0)
        T::vst_nt(p, v);  // non-temporal: no read-for-ownership of the output lines
    else
        T::vst(p, v);
}

#if RK_VB == 32 && defined(__AVX2__)
// bfloat16 without AVX-512 (AVX2 only): the generic path widens and rounds 8 lanes at a
// time with a shift/shuffle-heavy sequence that made bf16 ~2.3x slower than float16 on
// the same rows. Here 16 bf16 (32 bytes) are split into their even and odd elements with
// one shift and one AND (a bf16 is the top half of a float32), computed, rounded and
// re-interleaved with one 16-bit blend: no widening shuffles and no pack/permute. For the
// half layout cos/sin are split even/odd to match (two shuffles each); the interleaved
// layout's pairs are already even/odd. Rounding: round-to-nearest-even on the float32
// bits, u + 0x7FFF + (bit 16 of u), with no NaN test in the loop: every NaN reaching it has
// zero low 16 bits, so the increment cannot carry and the top half stays that NaN. (x86
// arithmetic returns either the default NaN 0xFFC00000 or an operand's NaN, quieted; the
// x operands are widened bf16, low bits zero, and the cos/sin rows are copied per table
// row with every NaN replaced by 0x7FC00000 — the one place a payload with low bits set
// could come from.) The same bits as the generic path for every value, NaN -> NaN.
static inline __m256i bf16_round_hi(__m256 y) {  // the bf16 in the top 16 bits of each lane
    const __m256i u = _mm256_castps_si256(y);
    const __m256i odd = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
    return _mm256_add_epi32(u, _mm256_add_epi32(odd, _mm256_set1_epi32(0x7FFF)));
}
// even lanes' bf16 in the low half of each 32-bit lane, odd lanes' in the high half
static inline __m256i bf16_join(__m256 ye, __m256 yo) {
    return _mm256_blend_epi16(_mm256_srli_epi32(bf16_round_hi(ye), 16), bf16_round_hi(yo), 0xAA);
}
static inline void bf16_split(__m256i v, __m256& e, __m256& o) {
    e = _mm256_castsi256_ps(_mm256_slli_epi32(v, 16));
    o = _mm256_castsi256_ps(_mm256_and_si256(v, _mm256_set1_epi32((int)0xFFFF0000u)));
}
template <int NT>
static inline void bf16_store(uint16_t* p, __m256i v) {
    if constexpr (NT != 0) {  // two 16-byte streaming stores: 16-byte alignment is enough
        _mm_stream_si128((__m128i*)p, _mm256_castsi256_si128(v));
        _mm_stream_si128((__m128i*)(p + 8), _mm256_extracti128_si256(v, 1));
    } else {
        _mm256_storeu_si256((__m256i*)p, v);
    }
}
// One table row copied for the rows (heads) that share it: the conjugation sign folded into
// sin, NaN replaced by the canonical 0x7FC00000 (see above), and for the half layout each
// block of 16 split even/odd to match bf16_split. n: a multiple of 16 (half) or 8.
enum { BF16_TAB_MAX = 1024 };  // pairs; longer rows take the generic path
static inline __m256 bf16_tab_clean(__m256 v) {
    return _mm256_blendv_ps(v, _mm256_castsi256_ps(_mm256_set1_epi32(0x7FC00000)), _mm256_cmp_ps(v, v, _CMP_UNORD_Q));
}
template <int LAYOUT>
static inline void bf16_prep_tables(const float* pc, const float* ps, float sign, i64 n, float* cb, float* sb) {
    const __m256 sg = _mm256_set1_ps(sign);
    if (LAYOUT == 1) {
        for (i64 i = 0; i < n; i += 8) {
            _mm256_store_ps(cb + i, bf16_tab_clean(_mm256_loadu_ps(pc + i)));
            _mm256_store_ps(sb + i, bf16_tab_clean(_mm256_loadu_ps(ps + i) * sg));
        }
        return;
    }
    for (i64 i = 0; i < n; i += 16) {
        const __m256 c0 = bf16_tab_clean(_mm256_loadu_ps(pc + i)), c1 = bf16_tab_clean(_mm256_loadu_ps(pc + i + 8));
        const __m256 s0 = bf16_tab_clean(_mm256_loadu_ps(ps + i) * sg);
        const __m256 s1 = bf16_tab_clean(_mm256_loadu_ps(ps + i + 8) * sg);
        // even (0 2 .. 14) and odd (1 3 .. 15) elements in order: in-lane shuffle, then qwords 0 2 1 3
        _mm256_store_ps(cb + i, (__m256)_mm256_permute4x64_pd((__m256d)_mm256_shuffle_ps(c0, c1, 0x88), 0xD8));
        _mm256_store_ps(cb + i + 8, (__m256)_mm256_permute4x64_pd((__m256d)_mm256_shuffle_ps(c0, c1, 0xDD), 0xD8));
        _mm256_store_ps(sb + i, (__m256)_mm256_permute4x64_pd((__m256d)_mm256_shuffle_ps(s0, s1, 0x88), 0xD8));
        _mm256_store_ps(sb + i + 8, (__m256)_mm256_permute4x64_pd((__m256d)_mm256_shuffle_ps(s0, s1, 0xDD), 0xD8));
    }
}
// Half layout, pairs (i + k, h + i + k) for i < n (a multiple of 16). Tables from bf16_prep_tables.
template <int NT>
static inline void row_bf16_avx2_half(const uint16_t* px, uint16_t* po, const float* cb, const float* sb, i64 h,
                                      i64 n) {
    for (i64 i = 0; i < n; i += 16) {
        __m256 ae, ao, be, bo;
        bf16_split(_mm256_loadu_si256((const __m256i*)(px + i)), ae, ao);
        bf16_split(_mm256_loadu_si256((const __m256i*)(px + h + i)), be, bo);
        const __m256 ce = _mm256_load_ps(cb + i), co = _mm256_load_ps(cb + i + 8);
        const __m256 se = _mm256_load_ps(sb + i), so = _mm256_load_ps(sb + i + 8);
        bf16_store<NT>(po + i, bf16_join(ae * ce - be * se, ao * co - bo * so));
        bf16_store<NT>(po + h + i, bf16_join(be * ce + ae * se, bo * co + ao * so));
    }
}
// Interleaved layout, pairs (2(i + k), 2(i + k) + 1) for i < n (a multiple of 8): the
// pairs are already even/odd (a = even, b = odd). Tables from bf16_prep_tables.
template <int NT>
static inline void row_bf16_avx2_il(const uint16_t* px, uint16_t* po, const float* cb, const float* sb, i64 n) {
    for (i64 i = 0; i < n; i += 8) {
        __m256 a, b;
        bf16_split(_mm256_loadu_si256((const __m256i*)(px + 2 * i)), a, b);
        const __m256 c = _mm256_load_ps(cb + i), s = _mm256_load_ps(sb + i);
        bf16_store<NT>(po + 2 * i, bf16_join(a * c - b * s, b * c + a * s));
    }
}
#define RK_BF16_AVX2 1
#else
#define RK_BF16_AVX2 0
#endif

template <typename T, int LAYOUT, int NT>
static inline void row(const typename T::S* px, typename T::S* po, const typename T::C* pc,
                       const typename T::C* ps, i64 h, typename T::C sign, i64 i = 0) {
    typedef typename T::C C;
    typedef typename T::V V;
    const int N = T::N;
    for (; i + N <= h; i += N) {
        V a, b;
        if (LAYOUT == 0) {
            a = T::vld(px + i);
            b = T::vld(px + h + i);
        } else {
            deint(T::vld(px + 2 * i), T::vld(px + 2 * i + N), a, b);
        }
        const V c = vload(pc + i);
        const V s = vload(ps + i) * sign;  // exact: sign is +-1
        const V y1 = a * c - b * s;
        const V y2 = b * c + a * s;
        if (LAYOUT == 0) {
            st<T, LAYOUT, NT>(po + i, y1);
            st<T, LAYOUT, NT>(po + h + i, y2);
        } else {
            V o0, o1;
            inter(y1, y2, o0, o1);
            st<T, LAYOUT, NT>(po + 2 * i, o0);
            st<T, LAYOUT, NT>(po + 2 * i + N, o1);
        }
    }
    if (i < h) {
        // the last h % N pairs: through the same vector code on zero-padded copies (a scalar
        // loop here gets SLP-vectorized by GCC into fmaddsub despite -ffp-contract=off)
        const i64 m = h - i;
        typename T::S xa[N], xb[N], ya[N], yb[N];
        C cc[N], sn[N];
        memset(xa, 0, sizeof xa);
        memset(xb, 0, sizeof xb);
        memset(cc, 0, sizeof cc);
        memset(sn, 0, sizeof sn);
        for (i64 k = 0; k < m; ++k) {
            xa[k] = px[LAYOUT == 0 ? i + k : 2 * (i + k)];
            xb[k] = px[LAYOUT == 0 ? h + i + k : 2 * (i + k) + 1];
            cc[k] = pc[i + k];
            sn[k] = ps[i + k];
        }
        const V a = T::vld(xa), b = T::vld(xb), c = vload(cc), s = vload(sn) * sign;
        T::vst(ya, a * c - b * s);
        T::vst(yb, b * c + a * s);
        for (i64 k = 0; k < m; ++k) {
            po[LAYOUT == 0 ? i + k : 2 * (i + k)] = ya[k];
            po[LAYOUT == 0 ? h + i + k : 2 * (i + k) + 1] = yb[k];
        }
    }
}

// The strided walk over a job's rows: the element offsets of x, out, cos, sin and a fifth
// operand (positions of a gather job, the gradient of a norm backward) for row r0, then of
// each next row (the last dim fastest, carrying into the ones before).
struct Walk {
    const i64 nd;
    const i64 *size, *xs, *os, *cs, *ss, *es;
    i64 idx[MAXD];
    i64 x = 0, o = 0, c = 0, s = 0, e = 0;
    Walk(i64 nd_, const i64* size_, const i64* xs_, const i64* os_, const i64* cs_, const i64* ss_, const i64* es_, i64 r0)
        : nd(nd_), size(size_), xs(xs_), os(os_), cs(cs_), ss(ss_), es(es_) {
        i64 rem = r0;
        for (int k = (int)nd - 1; k >= 0; --k) {
            idx[k] = rem % size[k];
            rem /= size[k];
        }
        for (int k = 0; k < (int)nd; ++k) {
            x += idx[k] * xs[k];
            o += idx[k] * os[k];
            c += idx[k] * cs[k];
            s += idx[k] * ss[k];
            e += idx[k] * es[k];
        }
    }
    void next() {
        for (int k = (int)nd - 1; k >= 0; --k) {
            ++idx[k];
            x += xs[k];
            o += os[k];
            c += cs[k];
            s += ss[k];
            e += es[k];
            if (idx[k] < size[k] || k == 0) break;
            x -= xs[k] * size[k];
            o -= os[k] * size[k];
            c -= cs[k] * size[k];
            s -= ss[k] * size[k];
            e -= es[k] * size[k];
            idx[k] = 0;
        }
    }
};

// Rows [r0, r1) of one job.
template <typename T, int LAYOUT, int NT>
static void run_rows(const Job& j, i64 r0, i64 r1) {
    typedef typename T::S S;
    typedef typename T::C C;
    const S* X = (const S*)(intptr_t)j.x;
    S* O = (S*)(intptr_t)j.o;
    const C* CT = (const C*)(intptr_t)j.c;
    const C* ST = (const C*)(intptr_t)j.s;
    const i64* P = (const i64*)(intptr_t)j.pos;
    const C sign = j.conj ? C(-1) : C(1);
    const i64 h = j.half, tail = j.d - 2 * j.half;
    const bool copy_tail = tail > 0 && (const void*)X != (const void*)O;

    Walk w(j.nd, j.size, j.xs, j.os, j.cs, j.ss, j.ps, r0);
#if RK_BF16_AVX2
    alignas(32) float cb[IsBF16<T>::value ? BF16_TAB_MAX : 1];
    alignas(32) float sb[IsBF16<T>::value ? BF16_TAB_MAX : 1];
    const C *lc = nullptr, *ls = nullptr;  // the table row now in cb/sb
    const i64 hv = h <= BF16_TAB_MAX ? h - h % (LAYOUT == 0 ? 16 : 8) : 0;  // pairs for the fast loop
#endif
    for (i64 r = r0; r < r1; ++r, w.next()) {
        const C *pc, *ps;
        if (j.gather) {
            const i64 p = P[w.e];
            pc = CT + p * h;
            ps = ST + p * h;
        } else {
            pc = CT + w.c;
            ps = ST + w.s;
        }
#if RK_BF16_AVX2
        if constexpr (IsBF16<T>::value) {
            if (hv > 0) {
                if (pc != lc || ps != ls) {  // a new table row: rows of one token's heads share it
                    bf16_prep_tables<LAYOUT>(pc, ps, sign, hv, cb, sb);
                    lc = pc;
                    ls = ps;
                }
                if (LAYOUT == 0)
                    row_bf16_avx2_half<NT>(X + w.x, O + w.o, cb, sb, h, hv);
                else
                    row_bf16_avx2_il<NT>(X + w.x, O + w.o, cb, sb, hv);
            }
            if (hv < h) row<T, LAYOUT, NT>(X + w.x, O + w.o, pc, ps, h, sign, hv);
        } else
#endif
            row<T, LAYOUT, NT>(X + w.x, O + w.o, pc, ps, h, sign);
        if (copy_tail) memcpy(O + w.o + 2 * h, X + w.x + 2 * h, (size_t)tail * sizeof(S));
    }
}

template <typename T, int NT>
static void dispatch_layout(const Job& j, i64 r0, i64 r1) {
    if (j.layout == 0)
        run_rows<T, 0, NT>(j, r0, r1);
    else
        run_rows<T, 1, NT>(j, r0, r1);
}

static void run_job(const Job& j, i64 r0, i64 r1) {
    switch (j.dtype) {
        case 0:
            if (j.nt)
                dispatch_layout<F32, 1>(j, r0, r1);
            else
                dispatch_layout<F32, 0>(j, r0, r1);
            break;
        case 1:
            if (j.nt)
                dispatch_layout<BF16, 1>(j, r0, r1);
            else
                dispatch_layout<BF16, 0>(j, r0, r1);
            break;
#if ROPEKIT_HAS_F16
        case 2: dispatch_layout<F16, 0>(j, r0, r1); break;
#endif
        case 3: dispatch_layout<F64, 0>(j, r0, r1); break;
        default: break;
    }
#if RK_HAS_NT
    if (j.nt) _mm_sfence();  // order the streaming stores before the thread reports done
#endif
}

// Global rows [g0, g1) over the concatenated jobs.
static void run_range(const Job* jobs, i64 njobs, i64 g0, i64 g1) {
    i64 base = 0;
    for (i64 n = 0; n < njobs && base < g1; ++n) {
        const i64 lo = g0 > base ? g0 : base;
        const i64 hi = g1 < base + jobs[n].nrows ? g1 : base + jobs[n].nrows;
        if (lo < hi) run_job(jobs[n], lo - base, hi - base);
        base += jobs[n].nrows;
    }
}

// ---------------------------------------------------------------------------------------
// Fused per-head RMSNorm + rotation (kernel.h: RkNormJob).
//
// Per row of d elements, in the compute type C (float32; float64 for float64):
//   forward   rstd = 1 / sqrt(sum(x²) / d + eps); y = (x·rstd)·w; out = rot(y) on the first r
//             dims (w = weight_offset + weight, formed by the caller); one rounding at the store
//   backward  u = rot(-θ)(g); x̂ = x·rstd; dw += u·x̂; v = u·w; out = rstd·(v - x̂·(Σ v·x̂) / d)
// Each row is widened once into a zero-padded buffer (one read of x and g, one write of out:
// the extra passes are over L1). Sums use 16 partial sums, lane k taking the elements
// i ≡ k (mod 16), then a fixed tree: the same bits at every level, whatever its vector width.
// The weight gradient is summed per RK_NORM_BLOCK rows into the caller's partial buffer (a
// block is always run by one thread, rows in order): the same bits for any thread count.

typedef RkNormJob NJob;

// The fixed tree over 16 partial sums p[0..15]: p[k] += p[k + w] for w = 8, 4, 2, 1; returns
// p[0]. The sums are held as 16 / N native vectors (acc[u] lane l = p[u·N + l]): the levels
// with w >= N are vector adds, the rest scalar.
template <typename V, typename C, int N>
static inline C tree16(V* acc) {
    for (int w = 8; w >= N; w /= 2)
        for (int u = 0; u < w / N; ++u) acc[u] = acc[u] + acc[u + w / N];
    C p[N];
    memcpy(p, &acc[0], sizeof(V));
    for (int w = (N > 8 ? 8 : N / 2); w >= 1; w /= 2)
        for (int k = 0; k < w; ++k) p[k] = p[k] + p[k + w];
    return p[0];
}

template <typename C> struct CompT;
template <> struct CompT<float> { typedef F32 T; };
template <> struct CompT<double> { typedef F64 T; };

// sum(a[i]·b[i]) for i < n (a multiple of 16; zero padded): lane i mod 16, then tree16
template <typename C>
static inline C dot16(const C* a, const C* b, i64 n) {
    typedef typename CompT<C>::T F;
    typedef typename F::V V;
    enum { N = F::N, U = 16 / F::N };
    V acc[U];
    memset(acc, 0, sizeof acc);
    for (i64 i = 0; i < n; i += 16)
        for (int u = 0; u < U; ++u) acc[u] += vload(a + i + u * N) * vload(b + i + u * N);
    return tree16<V, C, N>(acc);
}

// p[0, d) widened into buf[0, n), zero past d (n: d rounded up to 16)
template <typename T>
static inline void load_row(const typename T::S* p, typename T::C* buf, i64 d, i64 n) {
    typedef typename T::V V;
    const int N = T::N;
    i64 i = 0;
    for (; i + N <= d; i += N) {
        const V v = T::vld(p + i);
        memcpy(buf + i, &v, sizeof v);
    }
    if (i < d) {
        typename T::S t[N];
        memset(t, 0, sizeof t);
        memcpy(t, p + i, (size_t)(d - i) * sizeof(typename T::S));
        const V v = T::vld(t);
        memcpy(buf + i, &v, sizeof v);
        i += N;
    }
    for (; i < n; ++i) buf[i] = 0;
}

// buf[0, d) rounded into p[0, d)
template <typename T>
static inline void store_row(typename T::S* p, const typename T::C* buf, i64 d) {
    const int N = T::N;
    i64 i = 0;
    for (; i + N <= d; i += N) T::vst(p + i, vload(buf + i));
    if (i < d) {
        typename T::S t[N];
        T::vst(t, vload(buf + i));
        memcpy(p + i, t, (size_t)(d - i) * sizeof(typename T::S));
    }
}

static inline i64 pad16(i64 d) { return (d + 15) / 16 * 16; }

// sum(x²) over a row of d elements (a multiple of 16) straight from memory, in the order
// and 16-lane structure of dot16 (the same bits as dot16 on the widened row)
template <typename T>
static inline typename T::C sumsq16(const typename T::S* px, i64 d) {
    typedef typename T::C C;
    typedef typename T::V V;
    enum { N = T::N, U = 16 / T::N };
    V acc[U];
    memset(acc, 0, sizeof acc);
    for (i64 i = 0; i < d; i += 16)
        for (int u = 0; u < U; ++u) {
            const V v = T::vld(px + i + u * N);
            acc[u] += v * v;
        }
    return tree16<V, C, N>(acc);
}

// One row without buffers, for d a multiple of 16 and r/2 a multiple of the vector width
// (head dims 64, 128, 256, ... with rotary dims 2·N·k): the same operations in the same order
// as the buffered path below, so the same bits.
template <typename T, int LAYOUT>
static inline void norm_fwd_row_fast(const typename T::S* px, typename T::S* po, const typename T::C* pc,
                                     const typename T::C* ps, const typename T::C* W, i64 h, i64 d,
                                     typename T::C rstd) {
    typedef typename T::V V;
    const int N = T::N;
    for (i64 i = 0; i < h; i += N) {  // pairs: both lanes loaded before either is stored
        V a, b;
        if (LAYOUT == 0) {
            a = (T::vld(px + i) * rstd) * vload(W + i);
            b = (T::vld(px + h + i) * rstd) * vload(W + h + i);
        } else {
            const V n0 = (T::vld(px + 2 * i) * rstd) * vload(W + 2 * i);
            const V n1 = (T::vld(px + 2 * i + N) * rstd) * vload(W + 2 * i + N);
            deint(n0, n1, a, b);
        }
        const V c = vload(pc + i), s = vload(ps + i);
        const V y1 = a * c - b * s, y2 = b * c + a * s;
        if (LAYOUT == 0) {
            T::vst(po + i, y1);
            T::vst(po + h + i, y2);
        } else {
            V o0, o1;
            inter(y1, y2, o0, o1);
            T::vst(po + 2 * i, o0);
            T::vst(po + 2 * i + N, o1);
        }
    }
    for (i64 i = 2 * h; i < d; i += N) T::vst(po + i, (T::vld(px + i) * rstd) * vload(W + i));
}

// Rows [r0, r1) on the fast path, RK_NORM_GROUP rows at a time: their sums, then their inverse
// RMS, then their outputs, so that the long-latency sqrt/div of one row overlaps the others.
#define RK_NORM_GROUP 4
template <typename T, int LAYOUT>
static void norm_fwd_fast_rows(const NJob& j, Walk& w, i64 r0, i64 r1) {
    typedef typename T::S S;
    typedef typename T::C C;
    const S* X = (const S*)(intptr_t)j.x;
    S* O = (S*)(intptr_t)j.o;
    const C* CT = (const C*)(intptr_t)j.c;
    const C* ST = (const C*)(intptr_t)j.s;
    const C* W = (const C*)(intptr_t)j.w;
    C* R = (C*)(intptr_t)j.rstd;
    const i64 d = j.d, h = j.half;
    const C eps = (C)j.eps, dd = (C)d;
    for (i64 r = r0; r < r1; r += RK_NORM_GROUP) {
        const int m = r1 - r < RK_NORM_GROUP ? (int)(r1 - r) : RK_NORM_GROUP;
        i64 xo[RK_NORM_GROUP], oo[RK_NORM_GROUP], co[RK_NORM_GROUP], so[RK_NORM_GROUP];
        C rs[RK_NORM_GROUP];
        for (int u = 0; u < m; ++u, w.next()) xo[u] = w.x, oo[u] = w.o, co[u] = w.c, so[u] = w.s;
        for (int u = 0; u < m; ++u) rs[u] = sumsq16<T>(X + xo[u], d);
        for (int u = 0; u < m; ++u) rs[u] = C(1) / sqrt(rs[u] / dd + eps);
        for (int u = 0; u < m; ++u) norm_fwd_row_fast<T, LAYOUT>(X + xo[u], O + oo[u], CT + co[u], ST + so[u], W, h, d, rs[u]);
        if (R != nullptr)
            for (int u = 0; u < m; ++u) R[r + u] = rs[u];
    }
}

#if RK_BF16_AVX2
// bfloat16 on AVX2 (see row_bf16_avx2_half): rows split into even and odd elements with one
// shift and one AND, rounded and re-joined with one blend, the weights split once per call
// and each table row once per token (bf16_prep_tables: NaN made canonical, so the rounding
// needs no NaN test). The sums of squares keep dot16's lanes: even lane l of a 16-block is
// element 2l, odd lane l element 2l + 1, interleaved back into 16 partial sums for tree16.
// The same operations in the same order as the generic path: the same bits (NaN -> NaN).
static inline float bf16_sumsq16(const uint16_t* px, i64 d) {
    __m256 ae = _mm256_setzero_ps(), ao = _mm256_setzero_ps();
    for (i64 i = 0; i < d; i += 16) {
        __m256 e, o;
        bf16_split(_mm256_loadu_si256((const __m256i*)(px + i)), e, o);
        ae = _mm256_add_ps(ae, _mm256_mul_ps(e, e));
        ao = _mm256_add_ps(ao, _mm256_mul_ps(o, o));
    }
    const __m256 lo = _mm256_unpacklo_ps(ae, ao), hi = _mm256_unpackhi_ps(ae, ao);  // (e0 o0 e1 o1 | e4 o4 e5 o5), ...
    vf acc[2] = {(vf)_mm256_permute2f128_ps(lo, hi, 0x20), (vf)_mm256_permute2f128_ps(lo, hi, 0x31)};  // p0..7, p8..15
    return tree16<vf, float, 8>(acc);
}

template <int LAYOUT>
static void norm_fwd_bf16_rows(const NJob& j, Walk& w, i64 r0, i64 r1) {
    const uint16_t* X = (const uint16_t*)(intptr_t)j.x;
    uint16_t* O = (uint16_t*)(intptr_t)j.o;
    const float* CT = (const float*)(intptr_t)j.c;
    const float* ST = (const float*)(intptr_t)j.s;
    float* R = (float*)(intptr_t)j.rstd;
    const i64 d = j.d, h = j.half;
    const float eps = (float)j.eps, dd = (float)d;
    alignas(32) float wb[BF16_TAB_MAX], wb2[BF16_TAB_MAX];  // the weights split even/odd per 16-block
    alignas(32) float cb[BF16_TAB_MAX], sb[BF16_TAB_MAX];
    bf16_prep_tables<0>((const float*)(intptr_t)j.w, (const float*)(intptr_t)j.w, 1.0f, d, wb, wb2);
    const float *lc = nullptr, *ls = nullptr;
    for (i64 r = r0; r < r1; r += RK_NORM_GROUP) {
        const int m = r1 - r < RK_NORM_GROUP ? (int)(r1 - r) : RK_NORM_GROUP;
        i64 xo[RK_NORM_GROUP], oo[RK_NORM_GROUP], co[RK_NORM_GROUP], so[RK_NORM_GROUP];
        float rs[RK_NORM_GROUP];
        for (int u = 0; u < m; ++u, w.next()) xo[u] = w.x, oo[u] = w.o, co[u] = w.c, so[u] = w.s;
        for (int u = 0; u < m; ++u) rs[u] = bf16_sumsq16(X + xo[u], d);
        for (int u = 0; u < m; ++u) rs[u] = 1.0f / sqrtf(rs[u] / dd + eps);
        for (int u = 0; u < m; ++u) {
            const float *pc = CT + co[u], *ps = ST + so[u];
            if (pc != lc || ps != ls) {
                bf16_prep_tables<LAYOUT>(pc, ps, 1.0f, h, cb, sb);
                lc = pc, ls = ps;
            }
            const uint16_t* px = X + xo[u];
            uint16_t* po = O + oo[u];
            const __m256 rv = _mm256_set1_ps(rs[u]);
            auto norm = [&](i64 i, __m256& e, __m256& o) {  // elements [i, i + 16), i a multiple of 16
                bf16_split(_mm256_loadu_si256((const __m256i*)(px + i)), e, o);
                e = _mm256_mul_ps(_mm256_mul_ps(e, rv), _mm256_load_ps(wb + i));
                o = _mm256_mul_ps(_mm256_mul_ps(o, rv), _mm256_load_ps(wb + i + 8));
            };
            if (LAYOUT == 0) {
                for (i64 i = 0; i < h; i += 16) {
                    __m256 ae, ao, be, bo;
                    norm(i, ae, ao);
                    norm(h + i, be, bo);
                    const __m256 ce = _mm256_load_ps(cb + i), cq = _mm256_load_ps(cb + i + 8);
                    const __m256 se = _mm256_load_ps(sb + i), sq = _mm256_load_ps(sb + i + 8);
                    const __m256 y1e = _mm256_sub_ps(_mm256_mul_ps(ae, ce), _mm256_mul_ps(be, se));
                    const __m256 y1o = _mm256_sub_ps(_mm256_mul_ps(ao, cq), _mm256_mul_ps(bo, sq));
                    const __m256 y2e = _mm256_add_ps(_mm256_mul_ps(be, ce), _mm256_mul_ps(ae, se));
                    const __m256 y2o = _mm256_add_ps(_mm256_mul_ps(bo, cq), _mm256_mul_ps(ao, sq));
                    bf16_store<0>(po + i, bf16_join(y1e, y1o));
                    bf16_store<0>(po + h + i, bf16_join(y2e, y2o));
                }
            } else {
                for (i64 i = 0; i < h; i += 8) {  // elements [2i, 2i + 16): pairs i .. i + 7
                    __m256 a, b;
                    norm(2 * i, a, b);
                    const __m256 c = _mm256_load_ps(cb + i), sn = _mm256_load_ps(sb + i);
                    const __m256 y1 = _mm256_sub_ps(_mm256_mul_ps(a, c), _mm256_mul_ps(b, sn));
                    const __m256 y2 = _mm256_add_ps(_mm256_mul_ps(b, c), _mm256_mul_ps(a, sn));
                    bf16_store<0>(po + 2 * i, bf16_join(y1, y2));
                }
            }
            for (i64 i = 2 * h; i < d; i += 16) {
                __m256 e, o;
                norm(i, e, o);
                bf16_store<0>(po + i, bf16_join(e, o));
            }
        }
        if (R != nullptr)
            for (int u = 0; u < m; ++u) R[r + u] = rs[u];
    }
}
#endif

template <typename T, int LAYOUT>
static void norm_fwd_rows(const NJob& j, i64 r0, i64 r1) {
    typedef typename T::S S;
    typedef typename T::C C;
    typedef typename CompT<C>::T Fc;
    const S* X = (const S*)(intptr_t)j.x;
    S* O = (S*)(intptr_t)j.o;
    const C* CT = (const C*)(intptr_t)j.c;
    const C* ST = (const C*)(intptr_t)j.s;
    const C* W = (const C*)(intptr_t)j.w;
    C* R = (C*)(intptr_t)j.rstd;
    const i64 d = j.d, h = j.half, n = pad16(d);
    const C eps = (C)j.eps, dd = (C)d;
    Walk w(j.nd, j.size, j.xs, j.os, j.cs, j.ss, j.gs, r0);
#if RK_BF16_AVX2
    if constexpr (IsBF16<T>::value) {
        if (d % 16 == 0 && h % (LAYOUT == 0 ? 16 : 8) == 0 && d <= BF16_TAB_MAX) {
            norm_fwd_bf16_rows<LAYOUT>(j, w, r0, r1);
            return;
        }
    }
#endif
    if (d % 16 == 0 && h % T::N == 0) {
        norm_fwd_fast_rows<T, LAYOUT>(j, w, r0, r1);
        return;
    }
    std::vector<C> buf((size_t)n);
    C* b = buf.data();
    for (i64 r = r0; r < r1; ++r, w.next()) {
        load_row<T>(X + w.x, b, d, n);
        const C rstd = C(1) / sqrt(dot16(b, b, n) / dd + eps);
        for (i64 i = 0; i < d; ++i) b[i] = (b[i] * rstd) * W[i];
        row<Fc, LAYOUT, 0>(b, b, CT + w.c, ST + w.s, h, C(1));
        store_row<T>(O + w.o, b, d);
        if (R != nullptr) R[r] = rstd;
    }
}

// The backward of one row on the fast path (d % 16 == 0, r/2 a multiple of N): one pass over
// g and x forms u = rot(-θ)g, x̂, dw += u·x̂ and v = u·w into the buffers vb/xb (element
// order), then dot16(v, x̂) and a pass writing dx: the operations of the buffered path in
// the same order (the same bits), without its separate widening, rotation and scaling passes.
template <typename T, int LAYOUT>
static inline void norm_bwd_row_fast(const typename T::S* pg, const typename T::S* px, typename T::S* po,
                                     const typename T::C* pc, const typename T::C* ps, const typename T::C* W,
                                     typename T::C* acc, typename T::C rstd, i64 h, i64 d, typename T::C* vb,
                                     typename T::C* xb) {
    typedef typename T::C C;
    typedef typename T::V V;
    const int N = T::N;
    auto put = [&](i64 i, V u, V x) {  // elements [i, i + N): x̂, dw, v
        const V xh = x * rstd;
        if (acc != nullptr) {
            const V a = vload(acc + i) + u * xh;
            memcpy(acc + i, &a, sizeof a);
        }
        const V v = u * vload(W + i);
        memcpy(vb + i, &v, sizeof v);
        memcpy(xb + i, &xh, sizeof xh);
    };
    for (i64 i = 0; i < h; i += N) {
        V ga, gb;
        if (LAYOUT == 0) {
            ga = T::vld(pg + i), gb = T::vld(pg + h + i);
        } else {
            deint(T::vld(pg + 2 * i), T::vld(pg + 2 * i + N), ga, gb);
        }
        const V c = vload(pc + i), s = vload(ps + i) * C(-1);
        const V u1 = ga * c - gb * s, u2 = gb * c + ga * s;  // rot(-θ)
        if (LAYOUT == 0) {
            put(i, u1, T::vld(px + i));
            put(h + i, u2, T::vld(px + h + i));
        } else {
            V u0, u1i;
            inter(u1, u2, u0, u1i);
            put(2 * i, u0, T::vld(px + 2 * i));
            put(2 * i + N, u1i, T::vld(px + 2 * i + N));
        }
    }
    for (i64 i = 2 * h; i < d; i += N) put(i, T::vld(pg + i), T::vld(px + i));
    const C cc = dot16(vb, xb, d) / (C)d;
    for (i64 i = 0; i < d; i += N) T::vst(po + i, (vload(vb + i) - vload(xb + i) * cc) * rstd);
}

template <typename T, int LAYOUT>
static void norm_bwd_blocks(const NJob& j, i64 k0, i64 k1) {
    typedef typename T::S S;
    typedef typename T::C C;
    typedef typename CompT<C>::T Fc;
    const S* X = (const S*)(intptr_t)j.x;
    const S* G = (const S*)(intptr_t)j.g;
    S* O = (S*)(intptr_t)j.o;
    const C* CT = (const C*)(intptr_t)j.c;
    const C* ST = (const C*)(intptr_t)j.s;
    const C* W = (const C*)(intptr_t)j.w;
    const C* R = (const C*)(intptr_t)j.rstd;
    C* DW = (C*)(intptr_t)j.dwp;
    const i64 d = j.d, h = j.half, n = pad16(d);
    const C dd = (C)d;
    std::vector<C> buf((size_t)(2 * n));
    C *gb = buf.data(), *xb = buf.data() + n;
    const i64 r0 = k0 * RK_NORM_BLOCK, r1 = k1 * RK_NORM_BLOCK < j.nrows ? k1 * RK_NORM_BLOCK : j.nrows;
    Walk w(j.nd, j.size, j.xs, j.os, j.cs, j.ss, j.gs, r0);
    C* acc = nullptr;
    const bool fast = d % 16 == 0 && h % T::N == 0;
    for (i64 r = r0; r < r1; ++r, w.next()) {
        if (DW != nullptr && r % RK_NORM_BLOCK == 0) {
            acc = DW + (r / RK_NORM_BLOCK) * d;
            for (i64 i = 0; i < d; ++i) acc[i] = 0;
        }
        if (fast) {
            norm_bwd_row_fast<T, LAYOUT>(G + w.e, X + w.x, O + w.o, CT + w.c, ST + w.s, W, acc, R[r], h, d, gb, xb);
            continue;
        }
        load_row<T>(G + w.e, gb, d, n);
        load_row<T>(X + w.x, xb, d, n);
        row<Fc, LAYOUT, 0>(gb, gb, CT + w.c, ST + w.s, h, C(-1));  // u = rot(-θ) g
        const C rstd = R[r];
        for (i64 i = 0; i < d; ++i) xb[i] = xb[i] * rstd;  // x̂
        if (acc != nullptr)
            for (i64 i = 0; i < d; ++i) acc[i] = acc[i] + gb[i] * xb[i];
        for (i64 i = 0; i < d; ++i) gb[i] = gb[i] * W[i];  // v
        const C cc = dot16(gb, xb, n) / dd;
        for (i64 i = 0; i < d; ++i) gb[i] = rstd * (gb[i] - xb[i] * cc);
        store_row<T>(O + w.o, gb, d);
    }
}

template <int FWD, typename T>
static inline void norm_layout(const NJob& j, i64 a, i64 b) {
    if (FWD) {
        if (j.layout == 0)
            norm_fwd_rows<T, 0>(j, a, b);
        else
            norm_fwd_rows<T, 1>(j, a, b);
    } else {
        if (j.layout == 0)
            norm_bwd_blocks<T, 0>(j, a, b);
        else
            norm_bwd_blocks<T, 1>(j, a, b);
    }
}

template <int FWD>
static void norm_job(const NJob& j, i64 a, i64 b) {
    switch (j.dtype) {
        case 0: norm_layout<FWD, F32>(j, a, b); break;
        case 1: norm_layout<FWD, BF16>(j, a, b); break;
#if ROPEKIT_HAS_F16
        case 2: norm_layout<FWD, F16>(j, a, b); break;
#endif
        case 3: norm_layout<FWD, F64>(j, a, b); break;
        default: break;
    }
}

// units [g0, g1) over the concatenated jobs: rows (forward) or RK_NORM_BLOCK-row blocks (backward)
template <int FWD>
static void norm_range(const NJob* jobs, i64 njobs, i64 g0, i64 g1) {
    i64 base = 0;
    for (i64 n = 0; n < njobs && base < g1; ++n) {
        const i64 units = FWD ? jobs[n].nrows : (jobs[n].nrows + RK_NORM_BLOCK - 1) / RK_NORM_BLOCK;
        const i64 lo = g0 > base ? g0 : base;
        const i64 hi = g1 < base + units ? g1 : base + units;
        if (lo < hi) norm_job<FWD>(jobs[n], lo - base, hi - base);
        base += units;
    }
}

}  // namespace

using namespace RK_CAT(rk_, RK_LEVEL);

extern "C" {

int RK_CAT(rk_features_, RK_LEVEL)(void) { return ROPEKIT_HAS_F16 ? 1 : 0; }

void RK_CAT(rk_finish_, RK_LEVEL)(RkJob* jobs, i64 njobs, i64 bytes, i64 nt_bytes) {
    // streaming stores pay off only when the output is far larger than the caches and is
    // not the input; they need every vector store aligned to its width
    for (i64 n = 0; n < njobs; ++n) {
        Job& j = jobs[n];
        const i64 es = j.dtype == 0 ? 4 : j.dtype == 3 ? 8 : 2;
        const i64 A = (j.dtype == 0 ? NF * 4 : NF * 2);
        bool nt = RK_HAS_NT && (j.dtype == 0 || j.dtype == 1) && bytes / 2 >= nt_bytes && j.x != j.o && j.o % A == 0 &&
                  (j.layout == 1 || (j.half * es) % A == 0);
        for (i64 k = 0; nt && k < j.nd; ++k) nt = (j.os[k] * es) % A == 0;
        j.nt = nt ? 1 : 0;
    }
}

void RK_CAT(rk_rows_, RK_LEVEL)(const RkJob* jobs, i64 njobs, i64 g0, i64 g1) { run_range(jobs, njobs, g0, g1); }

void RK_CAT(rk_norm_fwd_, RK_LEVEL)(const RkNormJob* jobs, i64 njobs, i64 g0, i64 g1) { norm_range<1>(jobs, njobs, g0, g1); }

void RK_CAT(rk_norm_bwd_, RK_LEVEL)(const RkNormJob* jobs, i64 njobs, i64 b0, i64 b1) { norm_range<0>(jobs, njobs, b0, b1); }

}  // extern "C"
