// ropekit fused CPU rotary kernel (plain C++17, no torch headers).
//
// Built on first use by ropekit/backends/_cpu_build.py with the system C++ compiler and
// loaded through ctypes; see ropekit/backends/cpu.py for the Python side.
//
// One call rotates a few "jobs" (e.g. q and k). Python passes each tensor's raw sizes
// and element strides (it does no shape work: that keeps the per-call overhead to a
// couple of microseconds); rk_rotate broadcasts the tables, drops size-1 dims and merges
// dims that are contiguous for every operand, giving rows of d elements over at most
// MAXD leading dims. The last dim must be unit-stride (else Python uses eager). Each row
// takes its half-width cos/sin row either through strides (zero strides = broadcast) or
// through a position index into a contiguous [n, r/2] table (gather).
//
// Precision: loads widen to the compute type C (float32 for float32/bfloat16/float16,
// float64 for float64), y1 = x1*c - x2*s and y2 = x2*c + x1*s are computed in C with
// separately rounded products (-ffp-contract=off: the same bits with or without FMA
// hardware), then rounded once to the storage type (round-to-nearest-even for bf16).
//
// In place (out == x) is safe: every block of pairs is fully loaded into local arrays
// before any of it is stored, and both lanes of a pair are in the same block.
// Threads: the rows of all jobs form one range, split evenly across pthreads.

// C headers only (<thread> alone doubles the build time); threads are pthreads.
#include <pthread.h>
#include <stdint.h>
#include <string.h>
#if defined(__linux__)
#include <sys/mman.h>
#endif
#if defined(__AVX2__) || defined(__AVX512F__)
#include <immintrin.h>
#define RK_HAS_NT 1
#else
#define RK_HAS_NT 0
#endif

typedef int64_t i64;

namespace {

enum { MAXD = 8 };

// Normalised job (built by parse() from the packed arguments).
struct Job {
    i64 dtype;    // 0 float32, 1 bfloat16, 2 float16, 3 float64
    i64 layout;   // 0 half (i, i + r/2), 1 interleaved (2i, 2i + 1)
    i64 conj;     // 1: rotate by -theta (sin -> -sin)
    i64 gather;   // 1: table rows come from pos[], else from cos/sin strides
    i64 half;     // r/2
    i64 d;        // head dim (elements past r are copied when out != x)
    i64 x, o, c, s, pos;  // addresses
    i64 npos, ntable;     // positions count, table rows (gather only)
    i64 nd;               // leading (row) dims after normalisation
    i64 nrows;
    i64 nt;               // 1: non-temporal stores (large out != x, aligned; float32/bfloat16)
    i64 size[MAXD];
    i64 xs[MAXD], os[MAXD], cs[MAXD], ss[MAXD], ps[MAXD];  // element strides
};

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

    const int nd = (int)j.nd;
    i64 idx[MAXD];
    i64 rem = r0;
    for (int k = nd - 1; k >= 0; --k) {
        idx[k] = rem % j.size[k];
        rem /= j.size[k];
    }
    i64 xo = 0, oo = 0, co = 0, so = 0, po = 0;
    for (int k = 0; k < nd; ++k) {
        xo += idx[k] * j.xs[k];
        oo += idx[k] * j.os[k];
        co += idx[k] * j.cs[k];
        so += idx[k] * j.ss[k];
        po += idx[k] * j.ps[k];
    }
#if RK_BF16_AVX2
    alignas(32) float cb[IsBF16<T>::value ? BF16_TAB_MAX : 1];
    alignas(32) float sb[IsBF16<T>::value ? BF16_TAB_MAX : 1];
    const C *lc = nullptr, *ls = nullptr;  // the table row now in cb/sb
    const i64 hv = h <= BF16_TAB_MAX ? h - h % (LAYOUT == 0 ? 16 : 8) : 0;  // pairs for the fast loop
#endif
    for (i64 r = r0; r < r1; ++r) {
        const C *pc, *ps;
        if (j.gather) {
            const i64 p = P[po];
            pc = CT + p * h;
            ps = ST + p * h;
        } else {
            pc = CT + co;
            ps = ST + so;
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
                    row_bf16_avx2_half<NT>(X + xo, O + oo, cb, sb, h, hv);
                else
                    row_bf16_avx2_il<NT>(X + xo, O + oo, cb, sb, hv);
            }
            if (hv < h) row<T, LAYOUT, NT>(X + xo, O + oo, pc, ps, h, sign, hv);
        } else
#endif
            row<T, LAYOUT, NT>(X + xo, O + oo, pc, ps, h, sign);
        if (copy_tail) memcpy(O + oo + 2 * h, X + xo + 2 * h, (size_t)tail * sizeof(S));
        for (int k = nd - 1; k >= 0; --k) {  // next row index, carrying
            ++idx[k];
            xo += j.xs[k];
            oo += j.os[k];
            co += j.cs[k];
            so += j.ss[k];
            po += j.ps[k];
            if (idx[k] < j.size[k] || k == 0) break;
            xo -= j.xs[k] * j.size[k];
            oo -= j.os[k] * j.size[k];
            co -= j.cs[k] * j.size[k];
            so -= j.ss[k] * j.size[k];
            po -= j.ps[k] * j.size[k];
            idx[k] = 0;
        }
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

struct Share {
    const Job* jobs;
    i64 njobs, g0, g1;
};

static void* share_main(void* arg) {
    const Share* sh = (const Share*)arg;
    run_range(sh->jobs, sh->njobs, sh->g0, sh->g1);
    return nullptr;
}

// The OpenMP runtime torch already runs (set by rk_use_openmp; cpu.py finds it in the
// process). After any torch op its worker threads spin for a while waiting for more work;
// threads of our own then compete with them for the cores (2 cores: our second thread ran
// at a fraction of its speed, bf16 in place took 1.45 ms with 2 threads vs 1.51 with 1).
// Running our split on torch's own team avoids that and costs no thread creation.
typedef void (*GompParallel)(void (*)(void*), void*, unsigned, unsigned);
typedef int (*OmpInt)(void);
static GompParallel g_gomp_parallel = nullptr;
static OmpInt g_omp_thread_num = nullptr, g_omp_num_threads = nullptr;

struct OmpShare {
    const Job* jobs;
    i64 njobs, total;
};

static void omp_body(void* arg) {
    const OmpShare* sh = (const OmpShare*)arg;
    const i64 t = g_omp_thread_num(), n = g_omp_num_threads();  // the team may be smaller than asked
    run_range(sh->jobs, sh->njobs, sh->total * t / n, sh->total * (t + 1) / n);
}

// All rows of jobs[0..njobs) on up to nthreads threads (the caller is one of them).
static void run_parallel(const Job* jobs, i64 njobs, i64 total, i64 nthreads) {
    enum { MAXT = 64 };
    if (nthreads > total) nthreads = total;
    if (nthreads > MAXT) nthreads = MAXT;
    if (nthreads <= 1) {
        run_range(jobs, njobs, 0, total);
        return;
    }
    if (g_gomp_parallel) {
        OmpShare sh{jobs, njobs, total};
        g_gomp_parallel(omp_body, &sh, (unsigned)nthreads, 0);
        return;
    }
    Share sh[MAXT];
    pthread_t tid[MAXT];
    bool started[MAXT] = {false};
    for (i64 t = 0; t < nthreads; ++t) sh[t] = Share{jobs, njobs, total * t / nthreads, total * (t + 1) / nthreads};
    for (i64 t = 1; t < nthreads; ++t) started[t] = pthread_create(&tid[t], nullptr, share_main, &sh[t]) == 0;
    share_main(&sh[0]);
    for (i64 t = 1; t < nthreads; ++t) {
        if (started[t])
            pthread_join(tid[t], nullptr);
        else
            share_main(&sh[t]);  // could not start a thread: do its share here
    }
}

}  // namespace

extern "C" {

// Bit 0: float16 compiled in. The ABI version lets Python reject a stale library.
int rk_features(void) { return ROPEKIT_HAS_F16 ? 1 : 0; }
int rk_abi(void) { return 7; }

// Use an OpenMP runtime's team for the threads: the addresses of its GOMP_parallel,
// omp_get_thread_num and omp_get_num_threads (all nonzero), or zeros for our own pthreads.
int rk_use_openmp(i64 parallel, i64 thread_num, i64 num_threads) {
    if (!parallel || !thread_num || !num_threads) {
        g_gomp_parallel = nullptr;
        g_omp_thread_num = g_omp_num_threads = nullptr;
        return 1;
    }
    g_omp_thread_num = (OmpInt)(intptr_t)thread_num;
    g_omp_num_threads = (OmpInt)(intptr_t)num_threads;
    g_gomp_parallel = (GompParallel)(intptr_t)parallel;
    return 0;
}

// Ask for transparent huge pages on [addr, addr + nbytes) (its whole 2 MiB pages only), for a
// freshly allocated output before the kernel first writes it: with the kernel's THP mode
// "madvise" (a common default) every 4 KiB page of a large fresh tensor otherwise faults on
// its own, which made out-of-place calls ~3x slower than writing an existing buffer. Only a
// hint: returns 0 when applied, 1 when not (no MADV_HUGEPAGE, or the range holds no whole
// huge page), -1 when madvise refused it. Never changes the memory's contents.
int rk_advise_huge(i64 addr, i64 nbytes) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
    const i64 huge = (i64)2 << 20;
    const i64 lo = (addr + huge - 1) & ~(huge - 1), hi = (addr + nbytes) & ~(huge - 1);
    if (nbytes <= 0 || hi <= lo) return 1;
    return madvise((void*)(intptr_t)lo, (size_t)(hi - lo), MADV_HUGEPAGE) == 0 ? 0 : -1;
#else
    (void)addr;
    (void)nbytes;
    return 1;
#endif
}

// Packed arguments (int64), as written by cpu.py:
//   hdr = [njobs, max_threads, parallel_bytes, serial, nt_bytes, job 0, job 1, ...]
//   (serial = 1: job n+1 starts after job n has finished, for operands that may overlap;
//   out-of-place calls writing >= nt_bytes in total use non-temporal stores where aligned)
//   job = [dtype, layout, conj, gather, nx, nc, half, x, out, cos, sin, pos, npos, ntable,
//          x sizes (nx), x strides (nx), out strides (nx),
//          cos sizes (nc), cos strides (nc), sin strides (nc),     -- stride tables (gather 0)
//          pos strides (nx - 1)]                                   -- gather 1 (nc = 0)
// Tables broadcast against x's leading dims from the right (size-1 dims: stride 0).
// Returns 0 on success, 100 + n when job n has a position outside [0, ntable) (nothing
// written), 2 for an unsupported dtype, 3 for a layout the kernel does not take (a
// non-unit last-dim stride, too many dims, r > d): the caller then uses eager; 4 when
// out has a zero stride (expanded memory: not writable element-wise).
//
// rk_run(tpl, live) is the same call with the per-call values taken from a second, short
// block (cpu.py keeps one template per call signature and packs only what changes):
//   live = [max_threads, parallel_bytes, serial, nt_bytes, (x, out, cos, sin, pos) per job]
// replacing hdr[1..4] and each job's five addresses in the template tpl.
static int rotate_impl(const i64* hdr, const i64* live);

int rk_rotate(const i64* hdr) { return rotate_impl(hdr, nullptr); }
int rk_run(const i64* tpl, const i64* live) { return rotate_impl(tpl, live); }

static int rotate_impl(const i64* hdr, const i64* live) {
    enum { MAXJ = 4 };
    const i64 njobs = hdr[0];
    const i64* hv = live ? live - 1 : hdr;  // hv[1..4]: threads, parallel bytes, serial, nt bytes
    i64 nthreads = hv[1];
    const i64 par_bytes = hv[2];
    const i64 serial = hv[3];
    const i64 nt_bytes = hv[4];
    if (njobs < 1 || njobs > MAXJ) return 3;
    Job jobs[MAXJ];
    const i64* a = hdr + 5;
    i64 total = 0, bytes = 0;
    for (i64 n = 0; n < njobs; ++n) {
        Job& j = jobs[n];
        j.dtype = a[0]; j.layout = a[1]; j.conj = a[2]; j.gather = a[3];
        const i64 nx = a[4], nc = a[5];
        j.half = a[6];
        const i64* ad = live ? live + 4 + 5 * n : a + 7;  // x, out, cos, sin, pos
        j.x = ad[0]; j.o = ad[1]; j.c = ad[2]; j.s = ad[3]; j.pos = ad[4];
        j.npos = a[12]; j.ntable = a[13];
        const i64* xsz = a + 14;
        const i64* xst = xsz + nx;
        const i64* ost = xst + nx;
        const i64* csz = ost + nx;
        const i64* cst = csz + nc;
        const i64* sst = cst + nc;
        const i64* pst = sst + nc;
        a = pst + (j.gather ? nx - 1 : 0);
        if (j.dtype < 0 || j.dtype > 3 || (j.dtype == 2 && !ROPEKIT_HAS_F16)) return 2;
        if (nx < 1 || nc > nx || (j.gather && nc != 0) || (!j.gather && nc < 1)) return 3;
        j.d = xsz[nx - 1];
        if (2 * j.half > j.d || j.half < 1) return 3;
        if ((xst[nx - 1] != 1 || ost[nx - 1] != 1) && j.d > 1) return 3;
        if (!j.gather && nc >= 1 && (cst[nc - 1] != 1 || sst[nc - 1] != 1) && j.half > 1) return 3;
        // leading dims, innermost last; broadcast tables; drop size-1 dims; merge
        const i64 L = nx - 1;
        i64 nd = 0, nrows = 1;
        for (i64 i = 0; i < L; ++i) {
            const i64 sz = xsz[i];
            nrows *= sz;
            if (sz == 1) continue;
            if (ost[i] == 0) return 4;  // out would write one element many times
            i64 c = 0, sv = 0, p = 0;
            const i64 ci = i - (L - (nc - 1));  // the table dim aligned with x's dim i
            if (!j.gather && ci >= 0 && csz[ci] != 1) {
                c = cst[ci];
                sv = sst[ci];
            }
            if (j.gather) p = pst[i];
            if (nd > 0) {  // merge into the previous dim when every operand is contiguous across both
                const i64 q = nd - 1;
                if (j.xs[q] == xst[i] * sz && j.os[q] == ost[i] * sz && j.cs[q] == c * sz && j.ss[q] == sv * sz &&
                    j.ps[q] == p * sz) {
                    j.size[q] *= sz;
                    j.xs[q] = xst[i]; j.os[q] = ost[i]; j.cs[q] = c; j.ss[q] = sv; j.ps[q] = p;
                    continue;
                }
            }
            if (nd == MAXD) return 3;
            j.size[nd] = sz;
            j.xs[nd] = xst[i]; j.os[nd] = ost[i]; j.cs[nd] = c; j.ss[nd] = sv; j.ps[nd] = p;
            ++nd;
        }
        if (nd == 0) {  // a single row
            j.size[0] = 1;
            j.xs[0] = j.os[0] = j.cs[0] = j.ss[0] = j.ps[0] = 0;
            nd = 1;
        }
        j.nd = nd;
        j.nrows = nrows;
        if (j.gather) {
            // positions are contiguous here (cpu.py); check all before writing anything
            const i64* P = (const i64*)(intptr_t)j.pos;
            i64 bad = 0;
            for (i64 i = 0; i < j.npos; ++i) bad |= (P[i] < 0) | (P[i] >= j.ntable);
            if (bad) return (int)(100 + n);
        }
        total += nrows;
        bytes += 2 * nrows * j.d * (j.dtype == 0 ? 4 : j.dtype == 3 ? 8 : 2);
    }
    if (bytes < par_bytes) nthreads = 1;
    for (i64 n = 0; n < njobs; ++n) {
        // streaming stores pay off only when the output is far larger than the caches and
        // is not the input; they need every vector store aligned to its width
        Job& j = jobs[n];
        const i64 es = j.dtype == 0 ? 4 : j.dtype == 3 ? 8 : 2;
        const i64 A = (j.dtype == 0 ? NF * 4 : NF * 2);
        bool nt = RK_HAS_NT && (j.dtype == 0 || j.dtype == 1) && bytes / 2 >= nt_bytes && j.x != j.o && j.o % A == 0 &&
                  (j.layout == 1 || (j.half * es) % A == 0);
        for (i64 k = 0; nt && k < j.nd; ++k) nt = (j.os[k] * es) % A == 0;
        j.nt = nt ? 1 : 0;
    }
    if (serial) {
        for (i64 n = 0; n < njobs; ++n) run_parallel(&jobs[n], 1, jobs[n].nrows, nthreads);
    } else {
        run_parallel(jobs, njobs, total, nthreads);
    }
    return 0;
}

}  // extern "C"
