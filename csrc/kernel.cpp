// ropekit CPU rotary kernel: the SIMD math, plain C++17 (no torch headers).
//
// Compiled once per instruction-set level by setup.py (-DRK_LEVEL=default|avx2|avx512|
// avx512bf16 with that level's -m flags); ops.cpp picks the level at load time from the CPU's features
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

#include <type_traits>
#include <utility>
#include <vector>
#if defined(__AVX2__) || defined(__AVX512F__)
#include <immintrin.h>
#define RK_HAS_NT 1
#else
#define RK_HAS_NT 0
#if defined(__SSE2__)
#include <emmintrin.h>  // the baseline level on x86-64: movemask and minps in any() / vmin()
#endif
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

// SIMD through GCC/clang vector extensions, so one source compiles for every level: 64-byte
// vectors with AVX-512 (16 float lanes), 32-byte with AVX2, else 16-byte, the width of SSE2
// and NEON (wider vectors there would be split by the compiler, and their shuffles turn
// into scalar code). Intrinsics only for hardware conversions and streaming stores.
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#define RK_VB 64
#elif defined(__AVX2__)
#define RK_VB 32
#else
#define RK_VB 16
#endif
typedef float vf __attribute__((vector_size(RK_VB)));
typedef double vd __attribute__((vector_size(RK_VB)));
typedef uint32_t vu __attribute__((vector_size(RK_VB)));
typedef int32_t vi __attribute__((vector_size(RK_VB)));
typedef uint64_t vu64 __attribute__((vector_size(RK_VB)));
typedef uint16_t vh __attribute__((vector_size(RK_VB / 2)));
enum { NF = RK_VB / 4, ND = RK_VB / 8 };
#define RK_INLINE inline __attribute__((always_inline))

static inline vf vload(const float* p) { vf v; memcpy(&v, p, sizeof v); return v; }
static inline vd vload(const double* p) { vd v; memcpy(&v, p, sizeof v); return v; }
static inline vu vloadu(const uint16_t* p) { vu v; memcpy(&v, p, sizeof v); return v; }  // 2·NF halves

// NaN rule (docs/numerics.md): every value the kernel computes and stores is, when it is a
// NaN, the one canonical quiet NaN (+, payload 0: float32 0x7FC00000, float64
// 0x7FF8000000000000, bfloat16 0x7FC0, float16 0x7E00). Which NaN an arithmetic instruction
// returns depends on the hardware (x86 keeps an operand's sign and payload, and the default
// NaN is negative) and on the operand order the compiler picked at each level, so payloads
// cannot be kept the same everywhere: one blend per stored vector makes them so. Elements the
// kernel only copies (the tail past the rotary dims) keep their bits.
static RK_INLINE vf canon(vf y) {
    const vf q = (vf)((vu){} + 0x7FC00000u);
    return y != y ? q : y;
}
static RK_INLINE vd canon(vd y) {
    const vd q = (vd)((vu64){} + 0x7FF8000000000000ull);
    return y != y ? q : y;
}
static inline float canon1(float y) {
    const uint32_t q = 0x7FC00000u;
    if (y != y) memcpy(&y, &q, sizeof y);
    return y;
}
static inline double canon1(double y) {
    const uint64_t q = 0x7FF8000000000000ull;
    if (y != y) memcpy(&y, &q, sizeof y);
    return y;
}

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
#elif RK_VB == 32
#define RK_F_EVEN 0, 2, 4, 6, 8, 10, 12, 14
#define RK_F_ODD 1, 3, 5, 7, 9, 11, 13, 15
#define RK_F_LO 0, 8, 1, 9, 2, 10, 3, 11
#define RK_F_HI 4, 12, 5, 13, 6, 14, 7, 15
#define RK_D_EVEN 0, 2, 4, 6
#define RK_D_ODD 1, 3, 5, 7
#define RK_D_LO 0, 4, 1, 5
#define RK_D_HI 2, 6, 3, 7
#else
#define RK_F_EVEN 0, 2, 4, 6
#define RK_F_ODD 1, 3, 5, 7
#define RK_F_LO 0, 4, 1, 5
#define RK_F_HI 2, 6, 3, 7
#define RK_D_EVEN 0, 2
#define RK_D_ODD 1, 3
#define RK_D_LO 0, 2
#define RK_D_HI 1, 3
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

// Storage type S, compute type C, vector V of N compute lanes; vld widens, vst rounds (and
// makes NaN canonical: canon above).
struct F32 {
    typedef float S;
    typedef float C;
    typedef vf V;
    enum { N = NF };
    static inline V vld(const S* p) { return vload(p); }
    static inline void vst(S* p, V v) { v = canon(v); memcpy(p, &v, sizeof v); }
    static RK_INLINE void vst_raw(S* p, V v) { memcpy(p, &v, sizeof v); }  // v holds no NaN
#if RK_VB == 64
    static inline void vst_nt(S* p, V v) { _mm512_stream_ps(p, (__m512)canon(v)); }
#elif RK_VB == 32
    static inline void vst_nt(S* p, V v) { _mm256_stream_ps(p, (__m256)canon(v)); }
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
    static inline void vst(S* p, V v) { v = canon(v); memcpy(p, &v, sizeof v); }
};

// bfloat16 <-> float32 in 32-bit integer lanes (no x86 assumption). Widen: a bf16 is the top
// half of a float32 (exact). Round to nearest even: u + 0x7FFF + (bit 16 of u), then the top
// half; no NaN test, as the value is canon()'s first (0x7FC00000 -> 0x7FC0), and the
// increment cannot reach the exponent of anything else but an overflow to infinity.
static RK_INLINE vu bf16_round_hi(vf y) {  // the bf16 in the top 16 bits of each lane
    const vu u = (vu)canon(y);
    return u + 0x7FFFu + ((u >> 16) & 1u);
}
#if RK_VB == 64 && defined(__AVX512BF16__)
// avx512bf16 level: VCVTNEPS2BF16 / VCVTNE2PS2BF16 round to nearest even in one instruction,
// but read a float32 subnormal as zero (the formula above gives a bf16 subnormal) and keep a
// NaN's sign and top payload bits. They are used only on vectors with neither (one VFPCLASSPS
// each: QNaN 0x01 | denormal 0x20 | SNaN 0x80); a vector with any takes the formula above, so
// the bits are those of every other level. A normal float32 rounds to a normal bf16 or to
// infinity (same exponent range), so the instruction's flush of subnormal outputs never acts.
#define RK_BF16_CVT 1
static RK_INLINE bool bf16_cvt_ok(vf y) { return _mm512_fpclass_ps_mask((__m512)y, 0xA1) == 0; }
static RK_INLINE bool bf16_cvt_ok(vf y0, vf y1) {  // one KORTEST: no mask moved to a general register
    return _kortestz_mask16_u8(_mm512_fpclass_ps_mask((__m512)y0, 0xA1), _mm512_fpclass_ps_mask((__m512)y1, 0xA1));
}
#endif
// float16 <-> float32 in 32-bit integer lanes, for the levels without conversion instructions
// (F16C, or AArch64's, through _Float16 below): exact widening, round-to-nearest-even
// narrowing, the bits of those instructions (NaN: the canonical 0x7E00).
static RK_INLINE vf f16_widen(vu h) {  // h: a float16 in the low 16 bits of each lane
    const vu em = h & 0x7FFFu, sign = (h << 16) & 0x80000000u;
    const vu norm = (em << 13) + 0x38000000u + (((vi)em >= 0x7C00) & 0x38000000);  // rebias 15 -> 127; inf/NaN -> 255
    const vf sub = __builtin_convertvector((vi)em, vf) * 0x1p-24f;                   // subnormal: em·2^-24, exact
    return (vf)((((vi)em < 0x400) ? (vu)sub : norm) | sign);
}
static RK_INLINE vu f16_narrow(vf f) {  // the float16 in the low 16 bits of each lane
    const vu u = (vu)f, sign = (u >> 16) & 0x8000u;
    vf m = (vf)(u & 0x7FFFFFFFu);
    m = m < 65520.0f ? m : (vf){} + 65520.0f;  // 65520 and up (and NaN, fixed below) round to infinity
    const vu a = (vu)m;
    // normal: rebias 127 -> 15 and round the 13 dropped bits to nearest even (65520 carries
    // into 0x7C00, infinity)
    const vu nrm = (a + (0xFFFu - 0x38000000u) + ((a >> 13) & 1u)) >> 13;
    // subnormal: |f| + 0.5 puts the rounded float16 mantissa into the low float32 bits
    // (the add rounds to nearest even; its result is normal, so flush-to-zero cannot act)
    const vu sub = (vu)(m + 0.5f) - 0x3F000000u;
    const vu r = (((vi)a < 0x38800000) ? sub : nrm) | sign;
    return f != f ? (vu){} + 0x7E00u : r;
}
#if defined(__aarch64__) && RK_VB == 16
#define RK_F16_NATIVE 1  // AArch64: fcvtl / fcvtn (round to nearest even, NaN -> quiet with payload)
#include <arm_neon.h>
#else
#define RK_F16_NATIVE 0
#endif

static RK_INLINE bool any(vu m) {
#if RK_VB == 16 && defined(__SSE2__)
    return _mm_movemask_epi8((__m128i)m) != 0;  // lanes are all-ones or zero
#elif RK_VB == 32 && defined(__AVX2__)
    return !_mm256_testz_si256((__m256i)m, (__m256i)m);
#elif RK_VB == 64
    return _mm512_test_epi32_mask((__m512i)m, (__m512i)m) != 0;
#else
    uint64_t w[sizeof(vu) / 8];
    memcpy(w, &m, sizeof w);
    uint64_t r = 0;
    for (unsigned k = 0; k < sizeof(vu) / 8; ++k) r |= w[k];
    return r != 0;
#endif
}
static RK_INLINE vf vmin(vf a, vf b) {
#if RK_VB == 16 && defined(__SSE2__)
    return (vf)_mm_min_ps((__m128)a, (__m128)b);
#else
    return a < b ? a : b;
#endif
}

// Memory views of 2·NF half-width values as NF 32-bit lanes, split into the even elements
// (lanes e) and odd elements (lanes o): no widening shuffles, one shift or AND each way.
// FAST: split_fast / join_fast are cheaper formulas valid for normal values only; they add the
// lanes they cannot handle to `bad`, and a block with any such lane is redone exactly.
struct BF16Pair {
    enum { FAST = 0 };
    static RK_INLINE void split(const uint16_t* p, vf& e, vf& o) {
        const vu v = vloadu(p);
        e = (vf)(v << 16);
        o = (vf)(v & 0xFFFF0000u);
    }
    static RK_INLINE vu join(vf ye, vf yo) {
#ifdef RK_BF16_CVT
        if (__builtin_expect(bf16_cvt_ok(ye, yo), 1)) {
            // words 0..15 = ye, 16..31 = yo; interleave them: lane i = ye[i] | yo[i] << 16
            typedef int16_t vw32 __attribute__((vector_size(64)));
            const vw32 idx = {0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23,
                              8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31};
            const __m512i w = (__m512i)_mm512_cvtne2ps_pbh((__m512)yo, (__m512)ye);
            return (vu)_mm512_permutexvar_epi16((__m512i)idx, w);
        }
#endif
        return (bf16_round_hi(ye) >> 16) | (bf16_round_hi(yo) & 0xFFFF0000u);
    }
    static RK_INLINE void split_fast(const uint16_t* p, vf& e, vf& o, vu&) { split(p, e, o); }
    // The rotation's path (row_pair_*; see F16Pair), unscaled tables. Where the CPU has no
    // bfloat16 conversion, rot_out rounds without canon()'s blends: a NaN lane (the only value
    // the rounding formula gets wrong: its increment can carry into the sign) is flagged by
    // rot_check, and its block is narrowed again with join (the canonical NaN). The other lanes'
    // bits are join's.
#ifdef RK_BF16_CVT
    enum { ROT_FAST = 0 };
    static RK_INLINE vu rot_out(vf ye, vf yo, vf& mn) {
        mn = ye;
        return join(ye, yo);
    }
    static RK_INLINE void rot_check(vf, vf, vu&) {}
    static RK_INLINE vu join_fast(vf ye, vf yo, vu&) { return join(ye, yo); }
#else
    enum { ROT_FAST = 1 };
    // mn: all-ones in the lanes where ye or yo is a NaN
    static RK_INLINE vu rot_out(vf ye, vf yo, vf& mn) {
#if RK_VB == 64
        // the 16-bit word formula of the avx2 branch below, with AVX512BW's masks
        mn = (vf)_mm512_movm_epi32(_mm512_cmp_ps_mask((__m512)ye, (__m512)yo, _CMP_UNORD_Q));
        const __m512i ue = (__m512i)ye, uo = (__m512i)yo;
        const __mmask32 odd = 0xAAAAAAAAu;
        const __m512i H = _mm512_mask_blend_epi16(odd, _mm512_srli_epi32(ue, 16), uo);
        const __m512i L = _mm512_mask_blend_epi16(odd, ue, _mm512_slli_epi32(uo, 16));
        const __m512i one = _mm512_set1_epi16(1);
        const __m512i t = _mm512_adds_epu16(L, _mm512_and_si512(H, one));
        const __mmask32 c = _mm512_cmpgt_epu16_mask(t, _mm512_set1_epi16((short)0x8000));
        return (vu)_mm512_mask_add_epi16(H, c, H, one);
#elif RK_VB == 32 && defined(__AVX2__)
        mn = (vf)_mm256_cmp_ps((__m256)ye, (__m256)yo, _CMP_UNORD_Q);
        // In 16-bit words: H = the top halves (bf16 truncations; even elements in the even
        // words), L = the bottom halves. u + 0x7FFF + (bit 16 of u) carries into the top half
        // iff L + (H & 1) > 0x8000 (saturating: L = 0xFFFF carries either way), so the result
        // is H + carry, a 16-bit add (a carry out of 0xFFFF needs a NaN's top half). 9
        // instructions per 16 values against 11 for the 32-bit formula and its join.
        const __m256i ue = (__m256i)ye, uo = (__m256i)yo;
        const __m256i H = _mm256_blend_epi16(_mm256_srli_epi32(ue, 16), uo, 0xAA);
        const __m256i L = _mm256_blend_epi16(ue, _mm256_slli_epi32(uo, 16), 0xAA);
        const __m256i t = _mm256_adds_epu16(L, _mm256_and_si256(H, _mm256_set1_epi16(1)));
        const __m256i c = _mm256_cmpgt_epi16(_mm256_xor_si256(t, _mm256_set1_epi16((short)0x8000)), _mm256_setzero_si256());
        return (vu)_mm256_sub_epi16(H, c);
#else
#if RK_VB == 16 && defined(__SSE2__)
        mn = (vf)_mm_cmpunord_ps((__m128)ye, (__m128)yo);
#else
        mn = (vf)((vu)(ye != ye) | (vu)(yo != yo));
#endif
        const vu ue = (vu)ye, uo = (vu)yo;
        return ((ue + 0x7FFFu + ((ue >> 16) & 1u)) >> 16) | ((uo + 0x7FFFu + ((uo >> 16) & 1u)) & 0xFFFF0000u);
#endif
    }
    static RK_INLINE void rot_check(vf m1, vf m2, vu& bad) { bad |= (vu)m1 | (vu)m2; }
    // the same rounding for the fused norm's outputs: a block with a NaN is joined again
    static RK_INLINE vu join_fast(vf ye, vf yo, vu& bad) {
        vf m;
        const vu r = rot_out(ye, yo, m);
        bad |= (vu)m;
        return r;
    }
#endif
    static constexpr float ROT_SCALE = 1.0f;
    static RK_INLINE bool rot_ok() { return true; }
    static RK_INLINE void rot_in(const uint16_t* p, vf& e, vf& o, vu&) { split(p, e, o); }
    static RK_INLINE void rot_in2(const uint16_t* pa, const uint16_t* pb, vf& ae, vf& ao, vf& be, vf& bo, vu&) {
        split(pa, ae, ao);
        split(pb, be, bo);
    }
};
struct F16Pair {
    enum { FAST = 1 };
    static RK_INLINE void split(const uint16_t* p, vf& e, vf& o) {
        const vu v = vloadu(p);
        e = f16_widen(v & 0xFFFFu);
        o = f16_widen(v >> 16);
    }
    static RK_INLINE vu join(vf ye, vf yo) { return f16_narrow(ye) | (f16_narrow(yo) << 16); }
    // normal float16 (exponent field 1..30): rebias only
    static RK_INLINE void split_fast(const uint16_t* p, vf& e, vf& o, vu& bad) {
        const vu v = vloadu(p);
        // an arithmetic shift right by 3 moves exponent and mantissa into place and copies the
        // sign into bits 28..31; the mask keeps bit 31 only
        e = (vf)((((vi)(v << 16) >> 3) & (int32_t)0x8FFFE000) + 0x38000000);
        o = (vf)((((vi)v >> 3) & (int32_t)0x8FFFE000) + 0x38000000);
        typedef int16_t vw __attribute__((vector_size(RK_VB)));  // the 2·NF halves
        // exponent field 0 or 31: (x + 0x400) is 0x400 or 0x8000 (negative), else 0x800..0x7C00
        bad |= (vu)((((vw)v & (int16_t)0x7C00) + (int16_t)0x400) < (int16_t)0x800);
    }
    // results of normal float16 magnitude, [2^-14, 65520): rebias and round
    static RK_INLINE vu narrow_fast(vf f, vu& bad) {
        const vu u = (vu)f, a = u & 0x7FFFFFFFu;
        bad |= (vu)((vi)(a + (0x80000000u - 0x38800000u)) > (int32_t)(0x80000000u + 0x477FF000u - 0x38800000u - 1u));
        return ((a + (0xFFFu - 0x38000000u) + ((a >> 13) & 1u)) >> 13) | ((u >> 16) & 0x8000u);
    }
    static RK_INLINE vu join_fast(vf ye, vf yo, vu& bad) { return narrow_fast(ye, bad) | (narrow_fast(yo, bad) << 16); }

    // The rotation's path (row_pair_half / row_pair_il), cheaper than split_fast / join_fast:
    // inputs are widened without the 127 - 15 rebias, i.e. as x·2^-112, against tables scaled
    // by 2^112 (pair_tables): x·2^-112 · c·2^112 is x·c, so every product and sum, and its
    // rounding, is that of the unscaled operands. For a zero or subnormal float16, x·2^-112 is
    // a float32 subnormal: exact too, unless the CPU reads subnormal operands as zero (x86
    // MXCSR.DAZ, torch.set_flush_denormal: rot_ok() is then false and the generic row runs).
    // Inputs of exponent field 29..31 (|x| >= 2^14, infinity, NaN) send their block to the
    // exact conversions (split / join, unscaled tables). With |c| + |s| < 3.99 for every pair
    // of the table row (pair_tables' result; other rows take the generic row),
    // |y| <= 2^14·3.99·(1 + 2^-23) < 65520: the narrowing needs no overflow test, only the one
    // for results below 2^-14 (rot_check), which are redone exactly too.
    static constexpr float ROT_SCALE = 0x1p112f;
    static RK_INLINE bool rot_ok() {
#if defined(__SSE2__)
        return (_mm_getcsr() & 0x0040u) == 0;  // DAZ off
#else
        return true;  // no F16Pair build here reads subnormal operands as zero
#endif
    }
    typedef int16_t vw __attribute__((vector_size(RK_VB)));  // the 2·NF halves
    static RK_INLINE vw rot_exp(vu v) { return (vw)v & (int16_t)0x7C00; }  // exponent fields
    static RK_INLINE void rot_widen(vu v, vf& e, vf& o) {
        e = (vf)(((vi)(v << 16) >> 3) & (int32_t)0x8FFFE000);
        o = (vf)(((vi)v >> 3) & (int32_t)0x8FFFE000);
    }
    static RK_INLINE void rot_in(const uint16_t* p, vf& e, vf& o, vu& bad) {
        const vu v = vloadu(p);
        rot_widen(v, e, o);
        bad |= (vu)(rot_exp(v) > (int16_t)0x7000);
    }
    static RK_INLINE void rot_in2(const uint16_t* pa, const uint16_t* pb, vf& ae, vf& ao, vf& be, vf& bo, vu& bad) {
        const vu va = vloadu(pa), vb = vloadu(pb);
        rot_widen(va, ae, ao);
        rot_widen(vb, be, bo);
        const vw xa = rot_exp(va), xb = rot_exp(vb);
        bad |= (vu)((xa > xb ? xa : xb) > (int16_t)0x7000);
    }
    // |y| in [2^-14, 65520): rebias and round to nearest even; mn = min(|ye|, |yo|)
    static RK_INLINE vu rot_out(vf ye, vf yo, vf& mn) {
        const vu ue = (vu)ye, uo = (vu)yo, ae = ue & 0x7FFFFFFFu, ao = uo & 0x7FFFFFFFu;
        mn = vmin((vf)ae, (vf)ao);
        const vu ne = (ae + (0xFFFu - 0x38000000u) + ((ae >> 13) & 1u)) >> 13;
        const vu no = (ao + (0xFFFu - 0x38000000u) + ((ao >> 13) & 1u)) << 3;
        return ne | (no & 0xFFFF0000u) | ((ue >> 16) & 0x8000u) | (uo & 0x80000000u);
    }
    static RK_INLINE void rot_check(vf mn, vu& bad) { bad |= (vu)(mn < 0x1p-14f); }
    static RK_INLINE void rot_check(vf m1, vf m2, vu& bad) { rot_check(vmin(m1, m2), bad); }
    enum { ROT_FAST = 1 };
};
template <int NT>
static inline void pair_store(uint16_t* p, vu v) {
#if RK_VB == 64
    if constexpr (NT != 0) {  // two 32-byte streaming stores: 32-byte alignment is enough
        _mm256_stream_si256((__m256i*)p, _mm512_castsi512_si256((__m512i)v));
        _mm256_stream_si256((__m256i*)(p + 16), _mm512_extracti64x4_epi64((__m512i)v, 1));
        return;
    }
#elif RK_VB == 32
    if constexpr (NT != 0) {  // two 16-byte streaming stores: 16-byte alignment is enough
        _mm_stream_si128((__m128i*)p, _mm256_castsi256_si128((__m256i)v));
        _mm_stream_si128((__m128i*)(p + 8), _mm256_extracti128_si256((__m256i)v, 1));
        return;
    }
#endif
    memcpy(p, &v, sizeof v);
}

struct BF16 {
    typedef uint16_t S;
    typedef float C;
    typedef vf V;
    typedef BF16Pair P;
    enum { N = NF };
#if RK_VB == 64
    static inline V vld(const S* p) {
        return (V)_mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)p)), 16));
    }
    static inline __m256i pack(V f) {
#ifdef RK_BF16_CVT
        if (__builtin_expect(bf16_cvt_ok(f), 1)) return (__m256i)_mm512_cvtneps_pbh((__m512)f);
#endif
        return _mm512_cvtepi32_epi16((__m512i)(bf16_round_hi(f) >> 16));
    }
    static inline void vst(S* p, V f) { _mm256_storeu_si256((__m256i*)p, pack(f)); }
    static inline void vst_nt(S* p, V f) { _mm256_stream_si256((__m256i*)p, pack(f)); }
#elif RK_VB == 32
    static inline V vld(const S* p) {
        return (V)_mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i*)p)), 16));
    }
    static inline __m128i pack(V f) {  // 8 x u32 (< 2^16) -> 8 x u16: pack within 128-bit lanes, then join the halves
        const __m256i r = (__m256i)(bf16_round_hi(f) >> 16);
        return _mm256_castsi256_si128(_mm256_permute4x64_epi64(_mm256_packus_epi32(r, r), 0x08));
    }
    static inline void vst(S* p, V f) { _mm_storeu_si128((__m128i*)p, pack(f)); }
    static inline void vst_nt(S* p, V f) { _mm_stream_si128((__m128i*)p, pack(f)); }
#else
    static inline V vld(const S* p) {
        vh h;
        memcpy(&h, p, sizeof h);
        return (V)(__builtin_convertvector(h, vu) << 16);
    }
    static inline void vst(S* p, V f) {
        const vh h = __builtin_convertvector(bf16_round_hi(f) >> 16, vh);
        memcpy(p, &h, sizeof h);
    }
    static inline void vst_nt(S* p, V f) { vst(p, f); }
#endif
};

template <typename T> struct IsBF16 { enum { value = 0 }; };
template <> struct IsBF16<BF16> { enum { value = 1 }; };

// float16: F16C conversions (one instruction each way, round to nearest even) where the CPU
// has them, else f16_widen / f16_narrow above (the same bits).
#if defined(__F16C__) && defined(__AVX2__)
struct F16 {
    typedef uint16_t S;
    typedef float C;
    typedef vf V;
    enum { N = NF };
#if RK_VB == 64
    static inline V vld(const S* p) { return (V)_mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)p)); }
    static inline void vst(S* p, V f) {
        _mm256_storeu_si256((__m256i*)p, _mm512_cvtps_ph((__m512)canon(f), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
    }
    static RK_INLINE void vst_raw(S* p, V f) {  // f holds no NaN
        _mm256_storeu_si256((__m256i*)p, _mm512_cvtps_ph((__m512)f, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
    }
#else
    static inline V vld(const S* p) { return (V)_mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)p)); }
    static inline void vst(S* p, V f) {
        _mm_storeu_si128((__m128i*)p, _mm256_cvtps_ph((__m256)canon(f), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
    }
    static RK_INLINE void vst_raw(S* p, V f) {  // f holds no NaN
        _mm_storeu_si128((__m128i*)p, _mm256_cvtps_ph((__m256)f, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
    }
#endif
};
#define RK_F16_PAIR 0
#else
struct F16 {
    typedef uint16_t S;
    typedef float C;
    typedef vf V;
    typedef F16Pair P;
    enum { N = NF };
#if RK_F16_NATIVE
    static RK_INLINE V vld(const S* p) { return (V)vcvt_f32_f16(vreinterpret_f16_u16(vld1_u16(p))); }
    static RK_INLINE void vst(S* p, V f) { vst1_u16(p, vreinterpret_u16_f16(vcvt_f16_f32((float32x4_t)canon(f)))); }
#else
    // A vector of normal values (the common case) takes the cheap formulas of F16Pair's
    // split_fast / narrow_fast; one with any other value (zero, subnormal, infinity, NaN, a
    // result outside the float16 normal range) the exact conversions: the same bits.
    static RK_INLINE V vld(const S* p) {
        vh h;
        memcpy(&h, p, sizeof h);
        const vu v = __builtin_convertvector(h, vu), em = v & 0x7FFFu;
        // exponent field 1..30 <=> em - 0x400 < 0x7800 (unsigned) <=> em + 0x7FFFFC00 is below
        // INT_MIN + 0x7800 (signed): one compare
        if (!any((vu)((vi)(em + 0x7FFFFC00u) > (int32_t)(0x80000000u + 0x77FFu))))
            return (vf)((((vi)(v << 16) >> 3) & (int32_t)0x8FFFE000) + 0x38000000);
        return f16_widen(v);
    }
    static RK_INLINE void vst(S* p, V f) {
        vu bad = {};
        vu r = F16Pair::narrow_fast(f, bad);
        if (any(bad)) r = f16_narrow(f);
        const vh h = __builtin_convertvector(r, vh);
        memcpy(p, &h, sizeof h);
    }
#endif
};
#define RK_F16_PAIR 1
#endif
#define ROPEKIT_HAS_F16 1

// Which types take the paired (split even/odd) paths: bfloat16 at every level, float16 where
// it is converted in integer lanes.
template <typename T> struct Paired { enum { value = 0 }; };
template <> struct Paired<BF16> { enum { value = 1 }; };
#if RK_F16_PAIR && !RK_F16_NATIVE
template <> struct Paired<F16> { enum { value = 1 }; };
#endif

template <typename T, int LAYOUT, int NT>
static inline void st(typename T::S* p, typename T::V v) {
    if constexpr (NT != 0)
        T::vst_nt(p, v);  // non-temporal: no read-for-ownership of the output lines
    else
        T::vst(p, v);
}

// The paired rows (bfloat16; float16 without F16C): 2·NF half-width values loaded as NF
// 32-bit lanes and split into even and odd elements (P::split), computed, and re-joined
// (P::join): the same operations on the same values as the generic row below, so the same
// bits. For the half layout the cos/sin rows are split even/odd to match once per table row
// (pair_tables); the interleaved layout's pairs are already even/odd (a = even, b = odd).
enum { PAIR_TAB_MAX = 1024 };  // pairs; longer rows take the generic path
// cb/sb = the row's cos and sign·sin times `scale` (a power of two: exact), split even/odd for
// the half layout. Returns whether every pair has |c| + |s| < 3.99 (unscaled; false for a
// NaN or infinity): the bound F16Pair's rotation path relies on.
template <int LAYOUT>
static inline bool pair_tables(const float* pc, const float* ps, float sign, float scale, i64 n, float* cb, float* sb) {
    vu big = {};
    const vf sg = (vf){} + sign * scale, sc = (vf){} + scale;
    auto put = [&](i64 i, vf c, vf s) {
        const vf t = (vf)((vu)c & 0x7FFFFFFFu) + (vf)((vu)s & 0x7FFFFFFFu);
        big |= ~(vu)(t < 3.99f);  // NaN too
        c *= sc;
        s *= sg;
        memcpy(cb + i, &c, sizeof c);
        memcpy(sb + i, &s, sizeof s);
    };
    i64 i = 0;
    for (; i + 2 * NF <= n; i += 2 * NF) {
        vf c0 = vload(pc + i), c1 = vload(pc + i + NF), s0 = vload(ps + i), s1 = vload(ps + i + NF);
        if (LAYOUT == 0) {
            vf e, o;
            deint(c0, c1, e, o);
            c0 = e, c1 = o;
            deint(s0, s1, e, o);
            s0 = e, s1 = o;
        }
        put(i, c0, s0);
        put(i + NF, c1, s1);
    }
    if (i < n) put(i, vload(pc + i), vload(ps + i));  // interleaved only: n is a multiple of NF
    return !any(big);
}
// Half layout, the 2·NF pairs (i + k, h + i + k) against the split table row's vectors ce/co
// (cos, even / odd pairs) and se/so (sin).
template <typename P, int NT>
static RK_INLINE void pair_half_blk(const uint16_t* px, uint16_t* po, i64 h, i64 i, vf ce, vf co, vf se, vf so) {
    vf ae, ao, be, bo, m1, m2;
    vu bad = {};
    P::rot_in2(px + i, px + h + i, ae, ao, be, bo, bad);
    vu r1 = P::rot_out(ae * ce - be * se, ao * co - bo * so, m1);
    vu r2 = P::rot_out(be * ce + ae * se, bo * co + ao * so, m2);
#if defined(__SSE2__) && RK_VB == 16
    asm("" : "+x"(r1), "+x"(r2));  // computed here, not sunk below the branch (spills)
#endif
    P::rot_check(m1, m2, bad);
    if (P::ROT_FAST && any(bad)) {
        const float u = 1.0f / P::ROT_SCALE;  // the tables unscaled: exact
        ce *= u, co *= u, se *= u, so *= u;
        P::split(px + i, ae, ao);
        P::split(px + h + i, be, bo);
        r1 = P::join(ae * ce - be * se, ao * co - bo * so);
        r2 = P::join(be * ce + ae * se, bo * co + ao * so);
    }
    pair_store<NT>(po + i, r1);
    pair_store<NT>(po + h + i, r2);
}
// Half layout, pairs (i + k, h + i + k) for i < n (a multiple of 2·NF).
template <typename P, int NT>
static inline void row_pair_half(const uint16_t* px, uint16_t* po, const float* cb, const float* sb, i64 h, i64 n) {
    for (i64 i = 0; i < n; i += 2 * NF)
        pair_half_blk<P, NT>(px, po, h, i, vload(cb + i), vload(cb + i + NF), vload(sb + i), vload(sb + i + NF));
}
// A run of n rows a pointer step apart sharing one split table row (the heads of a token),
// each row's pairs in K blocks: the table row held in registers across the run instead of
// loaded again per row, and no loop per row (at 64-byte vectors, where the 32 registers hold
// it: d = 64 or 128; ad hoc A/B on a Zen 4 EPYC, bfloat16 [512, 32, 128] in place at
// avx512bf16: 5-10% less time). The operations of row_pair_half / row_pair_il on the same
// values, so the same bits.
template <typename P, int NT, int K>
static inline void run_pair_half(const uint16_t* px, uint16_t* po, i64 dx, i64 dox, i64 n, const float* cb,
                                 const float* sb, i64 h) {
    vf ce[K], co[K], se[K], so[K];
    for (int k = 0; k < K; ++k) {
        ce[k] = vload(cb + 2 * NF * k), co[k] = vload(cb + 2 * NF * k + NF);
        se[k] = vload(sb + 2 * NF * k), so[k] = vload(sb + 2 * NF * k + NF);
    }
    for (i64 u = 0; u < n; ++u, px += dx, po += dox)
#pragma GCC unroll 4
        for (int k = 0; k < K; ++k) pair_half_blk<P, NT>(px, po, h, 2 * NF * k, ce[k], co[k], se[k], so[k]);
}
// Interleaved layout, the NF pairs (2(i + k), 2(i + k) + 1) against the table row's vectors c, s.
template <typename P, int NT>
static RK_INLINE void pair_il_blk(const uint16_t* px, uint16_t* po, i64 i, vf c, vf s) {
    vf a, b, mn;
    vu bad = {};
    P::rot_in(px + 2 * i, a, b, bad);
    vu r = P::rot_out(a * c - b * s, b * c + a * s, mn);
    P::rot_check(mn, mn, bad);
    if (P::ROT_FAST && any(bad)) {
        const float u = 1.0f / P::ROT_SCALE;
        c *= u, s *= u;
        P::split(px + 2 * i, a, b);
        r = P::join(a * c - b * s, b * c + a * s);
    }
    pair_store<NT>(po + 2 * i, r);
}
template <typename P, int NT, int K>
static inline void run_pair_il(const uint16_t* px, uint16_t* po, i64 dx, i64 dox, i64 n, const float* cb,
                               const float* sb) {
    vf c[K], s[K];
    for (int k = 0; k < K; ++k) c[k] = vload(cb + NF * k), s[k] = vload(sb + NF * k);
    for (i64 u = 0; u < n; ++u, px += dx, po += dox)
#pragma GCC unroll 4
        for (int k = 0; k < K; ++k) pair_il_blk<P, NT>(px, po, NF * k, c[k], s[k]);
}
// Interleaved layout, pairs (2(i + k), 2(i + k) + 1) for i < n (a multiple of NF).
template <typename P, int NT>
static inline void row_pair_il(const uint16_t* px, uint16_t* po, const float* cb, const float* sb, i64 n) {
    for (i64 i = 0; i < n; i += NF) pair_il_blk<P, NT>(px, po, i, vload(cb + i), vload(sb + i));
}

// Float32, and float16 with F16C (every level but the portable one's float16): rows without
// canon()'s blend per stored vector and without the sign's multiply. A step's results are
// checked for NaN with one unordered compare per two vectors; a step with any is stored
// through canon() (the NaN rule's bits). `neg`: the
// conjugate rotation, sin negated (exact). Returns the first pair (half) or element
// (interleaved) not done; row() does the rest.
template <typename T> struct FastRow { enum { value = std::is_same<T, F32>::value }; };
#if defined(__F16C__) && defined(__AVX2__)
template <> struct FastRow<F16> { enum { value = 1 }; };
#endif
static RK_INLINE bool any_nan(vf a, vf b) {
#if RK_VB == 64
    return _mm512_cmp_ps_mask((__m512)a, (__m512)b, _CMP_UNORD_Q) != 0;
#elif RK_VB == 32 && defined(__AVX__)
    const __m256 m = _mm256_cmp_ps((__m256)a, (__m256)b, _CMP_UNORD_Q);
    return !_mm256_testz_ps(m, m);
#elif RK_VB == 16 && defined(__SSE2__)
    return _mm_movemask_ps(_mm_cmpunord_ps((__m128)a, (__m128)b)) != 0;
#else
    return any((vu)(a != a) | (vu)(b != b));
#endif
}
// Half layout, one step: U vectors of each half (px/po at the step's first pair) against the
// table row's vectors c[0, U), sn[0, U).
template <typename T, bool NEG, int U>
static RK_INLINE void half_fast_step(const typename T::S* px, typename T::S* po, i64 h, const vf* c, const vf* sn) {
    const int N = T::N;
    vf y1[U], y2[U];
    for (int u = 0; u < U; ++u) {
        const vf a = T::vld(px + u * N), b = T::vld(px + h + u * N);
        if (NEG) {
            y1[u] = a * c[u] + b * sn[u];  // a·c - b·(-s)
            y2[u] = b * c[u] - a * sn[u];  // b·c + a·(-s)
        } else {
            y1[u] = a * c[u] - b * sn[u];
            y2[u] = b * c[u] + a * sn[u];
        }
    }
    bool nan = false;
    for (int u = 0; u < U; ++u) nan |= any_nan(y1[u], y2[u]);
    if (__builtin_expect(nan, 0)) {
        for (int u = 0; u < U; ++u) T::vst(po + u * N, y1[u]);
        for (int u = 0; u < U; ++u) T::vst(po + h + u * N, y2[u]);
    } else {
        for (int u = 0; u < U; ++u) T::vst_raw(po + u * N, y1[u]);
        for (int u = 0; u < U; ++u) T::vst_raw(po + h + u * N, y2[u]);
    }
}
// Half layout: U vectors of each half per step (at least a 64-byte line of float32 output per half).
template <typename T, bool NEG>
static RK_INLINE i64 row_half_fast(const typename T::S* px, typename T::S* po, const float* pc, const float* ps, i64 h) {
    const int N = T::N;
    // 2 at 32-byte vectors, 4 at 16; 2 at 64 too (ad hoc A/B on a Zen 4 EPYC, float32 and float16
    // [512, 32, 128] in place: ~9% less time than one, which ran 4-6% slower than avx2)
    enum { U = T::N == 16 ? 2 : 64 / (4 * T::N) };
    i64 i = 0;
    for (; i + U * N <= h; i += U * N) {
        vf c[U], sn[U];
        for (int u = 0; u < U; ++u) c[u] = vload(pc + i + u * N), sn[u] = vload(ps + i + u * N);
        half_fast_step<T, NEG, U>(px + i, po + i, h, c, sn);
    }
    return i;
}
// Interleaved layout: x·cc + swap(x)·ss, swap exchanging the two elements of each pair, with
// the tables of the row duplicated per pair (il_tables: cc = c c, ss = -s s): the even element
// x0·c + x1·(-s) is x0·c - x1·s bit for bit (a - b is a + (-b) in IEEE arithmetic), the odd one
// x1·c + x0·s. No deinterleaving shuffles; 2·n elements, returns the first element not done.
static RK_INLINE vf pair_swap(vf x) {
#if RK_VB == 64
#define RK_F_SWAP 1, 0, 3, 2, 5, 4, 7, 6, 9, 8, 11, 10, 13, 12, 15, 14
#elif RK_VB == 32
#define RK_F_SWAP 1, 0, 3, 2, 5, 4, 7, 6
#else
#define RK_F_SWAP 1, 0, 3, 2
#endif
#ifdef RK_SHUF
    return RK_SHUF(x, x, RK_F_SWAP);
#else
    return __builtin_shuffle(x, (vi32){RK_F_SWAP});
#endif
}
static inline void il_tables(const float* pc, const float* ps, float sign, i64 n, float* cc, float* ss) {
    for (i64 k = 0; k < n; ++k) {
        const float sn = ps[k] * sign;
        cc[2 * k] = pc[k], cc[2 * k + 1] = pc[k];
        ss[2 * k] = -sn, ss[2 * k + 1] = sn;
    }
}
// Interleaved layout, one step: the 2·N elements at px against the per-pair tables' vectors
// c0, s0 (the first N) and c1, s1.
template <typename T>
static RK_INLINE void il_fast_step(const typename T::S* px, typename T::S* po, vf c0, vf s0, vf c1, vf s1) {
    const int N = T::N;
    const vf x0 = T::vld(px), x1 = T::vld(px + N);
    const vf y0 = x0 * c0 + pair_swap(x0) * s0;
    const vf y1 = x1 * c1 + pair_swap(x1) * s1;
    if (__builtin_expect(any_nan(y0, y1), 0)) {
        T::vst(po, y0);
        T::vst(po + N, y1);
    } else {
        T::vst_raw(po, y0);
        T::vst_raw(po + N, y1);
    }
}
template <typename T>
static RK_INLINE i64 row_il_fast(const typename T::S* px, typename T::S* po, const float* cc, const float* ss, i64 n2) {
    const int N = T::N;
    i64 i = 0;
    for (; i + 2 * N <= n2; i += 2 * N)
        il_fast_step<T>(px + i, po + i, vload(cc + i), vload(ss + i), vload(cc + i + N), vload(ss + i + N));
    return i;
}

// A run of n rows a pointer step apart sharing one table row, float32 / float16 (F16C) at
// 64-byte vectors: the table row (half layout: K vectors of cos and of sin; interleaved: the
// per-pair tables of il_tables, K vectors each) held in registers across the run, the steps of
// row_half_fast / row_il_fast unrolled per row. The same operations on the same values, so the
// same bits.
template <typename T, bool NEG, int K>
static inline void run_fast_half(const typename T::S* px, typename T::S* po, i64 dx, i64 dox, i64 n,
                                 const float* pc, const float* ps, i64 h) {
    const int N = T::N;
    vf c[K], sn[K];
    for (int k = 0; k < K; ++k) c[k] = vload(pc + k * N), sn[k] = vload(ps + k * N);
    for (i64 r = 0; r < n; ++r, px += dx, po += dox)
#pragma GCC unroll 8
        for (int k = 0; k < K; k += 2) half_fast_step<T, NEG, 2>(px + k * N, po + k * N, h, c + k, sn + k);
}
template <typename T, int K>
static inline void run_fast_il(const typename T::S* px, typename T::S* po, i64 dx, i64 dox, i64 n, const float* cc,
                               const float* ss) {
    const int N = T::N;
    vf c[K], s[K];
    for (int k = 0; k < K; ++k) c[k] = vload(cc + k * N), s[k] = vload(ss + k * N);
    for (i64 r = 0; r < n; ++r, px += dx, po += dox)
#pragma GCC unroll 8
        for (int k = 0; k < K; k += 2) il_fast_step<T>(px + k * N, po + k * N, c[k], s[k], c[k + 1], s[k + 1]);
}

template <typename T, int LAYOUT, int NT>
static inline void row(const typename T::S* px, typename T::S* po, const typename T::C* pc,
                       const typename T::C* ps, i64 h, typename T::C sign, i64 i = 0) {
    typedef typename T::C C;
    typedef typename T::V V;
    const int N = T::N;
    // Half layout, float32 / float64 with vectors narrower than a cache line: U vectors of
    // each half per step, every output line written whole before the next (out of place at
    // avx2, alternating half-line stores to the two halves' lines ran 5-10% slower than the
    // 16-byte vectors of the portable level; the same arithmetic per element)
    if constexpr (LAYOUT == 0 && sizeof(typename T::S) >= 4 && sizeof(typename T::S) * T::N < 64) {
        enum { U = 64 / (sizeof(typename T::S) * T::N) };
        for (; i + U * N <= h; i += U * N) {
            V y1[U], y2[U];
            for (int u = 0; u < U; ++u) {
                const V a = T::vld(px + i + u * N), b = T::vld(px + h + i + u * N);
                const V c = vload(pc + i + u * N), s = vload(ps + i + u * N) * sign;
                y1[u] = a * c - b * s;
                y2[u] = b * c + a * s;
            }
            for (int u = 0; u < U; ++u) st<T, LAYOUT, NT>(po + i + u * N, y1[u]);
            for (int u = 0; u < U; ++u) st<T, LAYOUT, NT>(po + h + i + u * N, y2[u]);
        }
    }
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
    // always inlined: called once per row, it was an out-of-line call through the PLT (8% of
    // the fused norm's time at decode)
    RK_INLINE void next() {
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
    // n rows on (n >= 1, and idx + n - 1 within the last dim's size)
    RK_INLINE void skip(i64 n) {
        const int k = (int)nd - 1;
        const i64 m = n - 1;
        idx[k] += m;
        x += m * xs[k], o += m * os[k], c += m * cs[k], s += m * ss[k], e += m * es[k];
        next();
    }
    // The offsets of x, out, cos and sin of the next n rows into X, O, C, S, advancing the
    // walk: the steps within the last dim in registers (the walk's members would otherwise be
    // reloaded after each store to the arrays, which may alias them), a carry through next().
    RK_INLINE void take(int n, i64* X, i64* O, i64* C, i64* S) {
        const int k = (int)nd - 1;
        const i64 sz = size[k], dx = xs[k], dox = os[k], dc = cs[k], ds = ss[k], de = es[k];
        i64 x_ = x, o_ = o, c_ = c, s_ = s, e_ = e, i = idx[k];
        for (int u = 0; u < n; ++u) {
            X[u] = x_, O[u] = o_, C[u] = c_, S[u] = s_;
            if (i + 1 < sz || k == 0) {
                ++i, x_ += dx, o_ += dox, c_ += dc, s_ += ds, e_ += de;
                continue;
            }
            x = x_, o = o_, c = c_, s = s_, e = e_, idx[k] = i;
            next();
            x_ = x, o_ = o, c_ = c, s_ = s, e_ = e, i = idx[k];
        }
        x = x_, o = o_, c = c_, s = s_, e = e_, idx[k] = i;
    }
};

// The split table rows (pair_tables) of a job whose walk comes back to them later, kept per
// call instead of split again for every row: a contiguous [b, h, s, d] x walks s innermost, so
// each row takes a new table row and every head takes the same rows again (split once per
// row, that layout ran at ~2.5x the time of [b, s, h, d] in bfloat16). One slot per table row,
// in table order (the rows are read back in the order they were written, as the table
// itself would be), filled when the row is first met. A slot holds exactly what pair_tables
// writes for that row, so the bits do not depend on it.
struct SplitTables {
    i64 w = 0;  // floats per slot (cos then sin)
    float* data = nullptr;
    unsigned char* state = nullptr;  // per slot: 0 empty, else 1 + pair_tables' result
    int kdim = -1;                   // the walk dim indexing the table rows (-1: a gather's positions)
    // rows: the table rows; width: floats per slot
    void init(i64 rows, i64 width, int k) {
        static thread_local std::vector<float> d;
        static thread_local std::vector<unsigned char> st;
        w = width, kdim = k;
        if ((i64)d.size() < rows * w) d.resize((size_t)(rows * w));
        st.assign((size_t)rows, 0);
        data = d.data(), state = st.data();
    }
};
// Whether the job's rows come back to its table rows (SplitTables): the tables move along one
// walk dim only (or come from a gather's positions) and rows along some other dim share them;
// the table rows in `rows`, the dim in `k`. false where they would take over 4 MiB.
static inline bool split_tables_pay(const Job& j, i64 hv, i64 nrows, i64& rows, int& k) {
    int moving = 0;
    bool reuse = false;
    k = -1;
    for (int i = 0; i < (int)j.nd; ++i) {
        const bool mv = j.gather ? j.ps[i] != 0 : j.cs[i] != 0 || j.ss[i] != 0;
        if (mv)
            ++moving, k = i;
        else if (j.size[i] > 1)
            reuse = true;
    }
    if (j.gather) {
        rows = j.ntable, k = -1;
    } else {
        if (moving != 1) return false;
        rows = j.size[k];
    }
    return reuse && rows > 0 && 2 * rows <= nrows && rows * (2 * hv) * 4 <= ((i64)4 << 20);
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

    Walk w(j.nd, j.size, j.xs, j.os, j.cs, j.ss, j.ps, r0);
    alignas(64) float cb[Paired<T>::value ? PAIR_TAB_MAX : 1];
    alignas(64) float sb[Paired<T>::value ? PAIR_TAB_MAX : 1];
    // the interleaved fast row's tables, duplicated per pair (row_il_fast)
    enum { IL = NT == 0 && FastRow<T>::value && LAYOUT == 1 };
    alignas(64) float dc[IL ? 2 * PAIR_TAB_MAX : 1];
    alignas(64) float ds[IL ? 2 * PAIR_TAB_MAX : 1];
    const bool ilv = IL && h <= PAIR_TAB_MAX;
    bool use_il = false;
    const C *lc = nullptr, *ls = nullptr;  // the table row now in cb/sb
    bool tab_ok = true;                     // pair_tables' bound for that row
    bool rot_ok = true;
    if constexpr (Paired<T>::value) rot_ok = T::P::rot_ok();
    const i64 hv = h <= PAIR_TAB_MAX ? h - h % (LAYOUT == 0 ? 2 * NF : NF) : 0;  // pairs for the paired loop
    // Rows along the last dim that share one table row (the heads of a token: tables, or a
    // gather's positions, broadcast over them) are taken as one run: the table row is looked up and prepared once
    // per run, and the run's rows are a pointer step apart (no walk per row).
    const int kl = (int)j.nd - 1;
    const bool shared = j.gather ? j.ps[kl] == 0 : j.cs[kl] == 0 && j.ss[kl] == 0;
    const i64 dx = j.xs[kl], dox = j.os[kl];
    const float *tcb = cb, *tsb = sb;  // the split row in use: cb/sb or a SplitTables slot
    SplitTables st;
    if constexpr (Paired<T>::value) {
        i64 rows;
        int k;
        if (!shared && hv > 0 && split_tables_pay(j, hv, r1 - r0, rows, k)) st.init(rows, 2 * hv, k);
    }
    for (i64 r = r0; r < r1;) {
        i64 n = 1;  // rows in this run: to the end of the last dim, or of the range
        if (shared) n = j.size[kl] - w.idx[kl] < r1 - r ? j.size[kl] - w.idx[kl] : r1 - r;
        const C *pc, *ps;
        i64 trow;  // the table row's index (SplitTables)
        if (j.gather) {
            const i64 p = P[w.e];
            pc = CT + p * h;
            ps = ST + p * h;
            trow = p;
        } else {
            pc = CT + w.c;
            ps = ST + w.s;
            trow = st.kdim >= 0 ? w.idx[st.kdim] : 0;
        }
        if constexpr (Paired<T>::value) {
            typedef typename T::P PP;
            if (hv > 0) {
                if (pc != lc || ps != ls) {  // a new table row: rows of one token's heads share it
                    if (st.data != nullptr) {
                        float* q = st.data + trow * st.w;
                        if (st.state[trow] == 0)
                            st.state[trow] = 1 + pair_tables<LAYOUT>(pc, ps, sign, PP::ROT_SCALE, hv, q, q + hv);
                        tab_ok = (st.state[trow] == 2 || !PP::FAST) && rot_ok;
                        tcb = q, tsb = q + hv;
                    } else {
                        tab_ok = (pair_tables<LAYOUT>(pc, ps, sign, PP::ROT_SCALE, hv, cb, sb) || !PP::FAST) && rot_ok;
                    }
                    lc = pc;
                    ls = ps;
                }
            }
        } else if constexpr (NT == 0 && FastRow<T>::value && LAYOUT == 1) {
            // the duplicated tables pay off over two rows or more: a table row used by one row
            // alone (tables per head, or the bhsd walk's new position each row) keeps the
            // deinterleaving row()
            use_il = ilv && (n >= 2 || (pc == lc && ps == ls));
            if (use_il && (pc != lc || ps != ls)) {
                il_tables((const float*)pc, (const float*)ps, (float)sign, h, dc, ds);
                lc = pc;
                ls = ps;
            }
        }
        const S* px = X + w.x;
        S* po = O + w.o;
        // at 64-byte vectors, a run of the usual head widths by the register paths
        // (run_fast_* / run_pair_*); false: its rows take the per-row paths below
        auto in_registers = [&]() -> bool {
            const int N = T::N;
            if constexpr (RK_VB == 64 && NT == 0 && FastRow<T>::value) {
                if (LAYOUT == 0 && h == 2 * N)
                    sign < 0 ? run_fast_half<T, true, 2>(px, po, dx, dox, n, pc, ps, h)
                             : run_fast_half<T, false, 2>(px, po, dx, dox, n, pc, ps, h);
                else if (LAYOUT == 0 && h == 4 * N)
                    sign < 0 ? run_fast_half<T, true, 4>(px, po, dx, dox, n, pc, ps, h)
                             : run_fast_half<T, false, 4>(px, po, dx, dox, n, pc, ps, h);
                else if (LAYOUT == 1 && use_il && h == 2 * N)
                    run_fast_il<T, 4>(px, po, dx, dox, n, dc, ds);
                else if (LAYOUT == 1 && use_il && h == 4 * N)
                    run_fast_il<T, 8>(px, po, dx, dox, n, dc, ds);
                else
                    return false;
                return true;
            } else if constexpr (RK_VB == 64 && Paired<T>::value) {
                typedef typename T::P PP;
                if (!tab_ok || hv != h)
                    return false;
                else if (LAYOUT == 0 && h == 2 * NF)
                    run_pair_half<PP, NT, 1>(px, po, dx, dox, n, tcb, tsb, h);
                else if (LAYOUT == 0 && h == 4 * NF)
                    run_pair_half<PP, NT, 2>(px, po, dx, dox, n, tcb, tsb, h);
                else if (LAYOUT == 1 && h == 2 * NF)
                    run_pair_il<PP, NT, 2>(px, po, dx, dox, n, tcb, tsb);
                else if (LAYOUT == 1 && h == 4 * NF)
                    run_pair_il<PP, NT, 4>(px, po, dx, dox, n, tcb, tsb);
                else
                    return false;
                return true;
            }
            return false;
        };
        if (n >= 2 && !copy_tail && in_registers()) {
            r += n;
            w.skip(n);
            continue;
        }
        for (i64 u = 0; u < n; ++u, px += dx, po += dox) {
            if constexpr (Paired<T>::value) {
                typedef typename T::P PP;
                if (hv > 0) {
                    if (!tab_ok)  // float16 with |c| + |s| >= 3.99 somewhere in the row (or NaN), or DAZ
                        row<T, LAYOUT, NT>(px, po, pc, ps, h, sign, 0);
                    else if (LAYOUT == 0)
                        row_pair_half<PP, NT>(px, po, tcb, tsb, h, hv);
                    else
                        row_pair_il<PP, NT>(px, po, tcb, tsb, hv);
                }
                if (hv < h && (hv == 0 || tab_ok)) row<T, LAYOUT, NT>(px, po, pc, ps, h, sign, hv);
            } else if constexpr (NT == 0 && FastRow<T>::value) {
                if (LAYOUT == 0) {
                    const i64 i = sign < 0 ? row_half_fast<T, true>(px, po, pc, ps, h) : row_half_fast<T, false>(px, po, pc, ps, h);
                    if (i < h) row<T, LAYOUT, NT>(px, po, pc, ps, h, sign, i);
                } else if (use_il) {
                    const i64 i = row_il_fast<T>(px, po, dc, ds, 2 * h) / 2;
                    if (i < h) row<T, LAYOUT, NT>(px, po, pc, ps, h, sign, i);
                } else
                    row<T, LAYOUT, NT>(px, po, pc, ps, h, sign);
            } else
                row<T, LAYOUT, NT>(px, po, pc, ps, h, sign);
            if (copy_tail) memcpy(po + 2 * h, px + 2 * h, (size_t)tail * sizeof(S));
        }
        r += n;
        w.skip(n);
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
#ifdef RK_SHUF
// lane k of the result: v[k] + v[k + W] for k < W (the other lanes are not used), in registers
template <int W, int N, typename V, size_t... I>
static RK_INLINE V fold_lanes(V v, std::index_sequence<I...>) {
    return v + __builtin_shufflevector(v, v, ((int)(I + W) % N)...);
}
template <int W, int N, typename V>
static RK_INLINE V fold_down(V v) {
    if constexpr (W == 0) {
        return v;
    } else {
        return fold_down<W / 2, N>(fold_lanes<W, N>(v, std::make_index_sequence<N>()));
    }
}
#endif
template <typename V, typename C, int N>
static RK_INLINE C tree16(V* acc) {
    for (int w = 8; w >= N; w /= 2)
        for (int u = 0; u < w / N; ++u) acc[u] = acc[u] + acc[u + w / N];
#ifdef RK_SHUF
    // the in-vector levels as lane shuffles (no round trip through the stack, whose
    // store-to-load forwarding serialised the rows of a group)
    return fold_down<(N > 8 ? 8 : N / 2), N>(acc[0])[0];
#else
    C p[N];
    memcpy(p, &acc[0], sizeof(V));
    for (int w = (N > 8 ? 8 : N / 2); w >= 1; w /= 2)
        for (int k = 0; k < w; ++k) p[k] = p[k] + p[k + w];
    return p[0];
#endif
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

// The sums of squares of RK_NORM_GROUP (8) rows at once, for 16 float lanes (avx512 levels):
// each row's lanes accumulate as in sumsq16 (16-element steps, one chain per row: eight
// independent chains), then the four in-vector levels of tree16 run on the eight rows
// together: each level adds the same lanes in the same pairs as tree16 does per row (k and
// k + 8, k and k + 4, k and k + 2, k and k + 1), with the rows packed side by side, so each
// sum has the bits of sumsq16 (NaN payloads aside: the results are made canonical later) in
// ~24 vector instructions for the eight rows instead of ~8 per row. Rows past m repeat row 0.
#if RK_VB == 64
#define RK_SUMSQ_X8 1
template <typename T>
static RK_INLINE void sumsq16_x8(const typename T::S* X, const i64* xo, int m, i64 d, float* out,
                                  float* keep = nullptr, i64 ld = 0) {
    // keep: row u's widened values are stored to keep[u·ld, u·ld + d) (element order)
    const typename T::S* p[8];
    for (int u = 0; u < 8; ++u) p[u] = X + xo[u < m ? u : 0];
    // the chains start from the first products (0 + v·v is v·v: a square is +0, positive or
    // NaN), not from a zeroed array: GCC kept that array in memory (a 512-byte memset per call)
    __m512 a[8];
    auto load = [&](int u, i64 i) {
        const vf v = T::vld(p[u] + i);
        if (keep != nullptr) memcpy(keep + u * ld + i, &v, sizeof v);
        return v;
    };
#pragma GCC unroll 8
    for (int u = 0; u < 8; ++u) {
        const vf v = load(u, 0);
        a[u] = (__m512)(v * v);
    }
    for (i64 i = 16; i < d; i += 16)
#pragma GCC unroll 8
        for (int u = 0; u < 8; ++u) {
            const vf v = load(u, i);
            a[u] = (__m512)((vf)a[u] + v * v);
        }
    // lanes k + k + 8 of two rows: [row 2v: 8 lanes | row 2v + 1: 8 lanes]
    __m512 b[4];
    for (int v = 0; v < 4; ++v)
        b[v] = (__m512)((vf)_mm512_shuffle_f32x4(a[2 * v], a[2 * v + 1], 0x44) +
                        (vf)_mm512_shuffle_f32x4(a[2 * v], a[2 * v + 1], 0xEE));
    // k + k + 4: 128-bit block j of c[v] = row 4v + j (4 lanes)
    __m512 c[2];
    for (int v = 0; v < 2; ++v)
        c[v] = (__m512)((vf)_mm512_shuffle_f32x4(b[2 * v], b[2 * v + 1], 0x88) +
                        (vf)_mm512_shuffle_f32x4(b[2 * v], b[2 * v + 1], 0xDD));
    // k + k + 2: block j = [row j: 2 lanes, row 4 + j: 2 lanes]
    const vf e = (vf)_mm512_shuffle_ps(c[0], c[1], 0x44) + (vf)_mm512_shuffle_ps(c[0], c[1], 0xEE);
    // k + k + 1: lane 4j = row j, lane 4j + 2 = row 4 + j
    const vf f = e + (vf)_mm512_permute_ps((__m512)e, 0xB1);
    const __m512i idx = _mm512_setr_epi32(0, 4, 8, 12, 2, 6, 10, 14, 0, 0, 0, 0, 0, 0, 0, 0);
    _mm256_storeu_ps(out, _mm512_castps512_ps256(_mm512_permutexvar_ps(idx, (__m512)f)));
}
#elif RK_VB == 32 && defined(__AVX2__)
// The avx2 level: 8 float lanes, so each row's 16 lanes are two vectors (acc0: lanes 0..7,
// acc1: 8..15), and rows go four at a time (eight chains in registers). The tree: k + k + 8
// is acc0 + acc1; k + k + 4 on two rows packed in the two 128-bit halves; k + k + 2 and
// k + k + 1 on four rows, as above. (One row's chains alone were latency-bound: 8 dependent
// adds of 3-4 cycles each per row, which the output work beside them did not hide.)
#define RK_SUMSQ_X8 1
template <typename T>
static RK_INLINE void sumsq16_x4(const typename T::S* const* p, i64 d, float* out, float* const* keep) {
    __m256 a0[4], a1[4];
    auto load = [&](int u, i64 i) {
        const vf v = T::vld(p[u] + i);
        if (keep != nullptr) memcpy(keep[u] + i, &v, sizeof v);
        return v;
    };
#pragma GCC unroll 4
    for (int u = 0; u < 4; ++u) {
        const vf v0 = load(u, 0), v1 = load(u, 8);
        a0[u] = (__m256)(v0 * v0);
        a1[u] = (__m256)(v1 * v1);
    }
    for (i64 i = 16; i < d; i += 16)
#pragma GCC unroll 4
        for (int u = 0; u < 4; ++u) {
            const vf v0 = load(u, i), v1 = load(u, i + 8);
            a0[u] = (__m256)((vf)a0[u] + v0 * v0);
            a1[u] = (__m256)((vf)a1[u] + v1 * v1);
        }
    vf b[4];
    for (int u = 0; u < 4; ++u) b[u] = (vf)a0[u] + (vf)a1[u];  // k + k + 8
    // k + k + 4: c[v] = [row 2v: lanes 0..3 | row 2v + 1: lanes 0..3]
    vf c[2];
    for (int v = 0; v < 2; ++v)
        c[v] = (vf)_mm256_permute2f128_ps((__m256)b[2 * v], (__m256)b[2 * v + 1], 0x20) +
               (vf)_mm256_permute2f128_ps((__m256)b[2 * v], (__m256)b[2 * v + 1], 0x31);
    // k + k + 2: half j = [row j: 2 lanes, row 2 + j: 2 lanes]
    const vf e = (vf)_mm256_shuffle_ps((__m256)c[0], (__m256)c[1], 0x44) + (vf)_mm256_shuffle_ps((__m256)c[0], (__m256)c[1], 0xEE);
    // k + k + 1: lane 4j = row j, lane 4j + 2 = row 2 + j
    const vf f = e + (vf)_mm256_permute_ps((__m256)e, 0xB1);
    out[0] = f[0], out[1] = f[4], out[2] = f[2], out[3] = f[6];
}
template <typename T>
static RK_INLINE void sumsq16_x8(const typename T::S* X, const i64* xo, int m, i64 d, float* out,
                                  float* keep = nullptr, i64 ld = 0) {
    // keep: row u's widened values are stored to keep[u·ld, u·ld + d) (element order)
    const typename T::S* p[8];
    float* kp[8];
    for (int u = 0; u < 8; ++u) p[u] = X + xo[u < m ? u : 0], kp[u] = keep != nullptr ? keep + u * ld : nullptr;
    sumsq16_x4<T>(p, d, out, keep != nullptr ? kp : nullptr);
    if (m > 4) sumsq16_x4<T>(p + 4, d, out + 4, keep != nullptr ? kp + 4 : nullptr);
}
#else
#define RK_SUMSQ_X8 0
template <typename T>
static inline void sumsq16_x8(const typename T::S*, const i64*, int, i64, float*, float* = nullptr, i64 = 0) {}  // not called
#endif

// One row without buffers, for d a multiple of 16 and r/2 a multiple of the vector width
// (head dims 64, 128, 256, ... with rotary dims 2·N·k): the same operations in the same order
// as the buffered path below, so the same bits.
// RAW (float32 / float64 storage, S == C): stores without canon, for a row whose outputs are
// known finite (finite_below and finite_rstd below).
template <typename T, int LAYOUT, bool RAW = false>
static inline void norm_fwd_row_fast(const typename T::S* px, typename T::S* po, const typename T::C* pc,
                                     const typename T::C* ps, const typename T::C* W, i64 h, i64 d,
                                     typename T::C rstd) {
    typedef typename T::V V;
    const int N = T::N;
    auto put = [](typename T::S* p, V v) {
        if constexpr (RAW)
            memcpy(p, &v, sizeof v);
        else
            T::vst(p, v);
    };
    // two result vectors: at the levels with FastRow, one unordered compare for both instead
    // of canon() on each (row_half_fast)
    auto put2 = [&](typename T::S* p1, V y1, typename T::S* p2, V y2) {
        if constexpr (!RAW && FastRow<T>::value)
            if (!__builtin_expect(any_nan(y1, y2), 0)) {
                T::vst_raw(p1, y1);
                T::vst_raw(p2, y2);
                return;
            }
        put(p1, y1);
        put(p2, y2);
    };
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
            put2(po + i, y1, po + h + i, y2);
        } else {
            V o0, o1;
            inter(y1, y2, o0, o1);
            put2(po + 2 * i, o0, po + 2 * i + N, o1);
        }
    }
    for (i64 i = 2 * h; i < d; i += N) put(po + i, (T::vld(px + i) * rstd) * vload(W + i));
}

// The interleaved layout by the in-pair swap (row_il_fast): y = n·cc + swap(n)·ss on the
// normalised row n, against the row's tables duplicated per pair (il_tables, sign +1); the
// same products and sums as norm_fwd_row_fast's deinterleaved pairs, so the same bits.
template <typename T, bool RAW>
static inline void norm_fwd_row_il(const typename T::S* px, typename T::S* po, const float* cc, const float* ss,
                                   const float* W, i64 h, i64 d, float rstd) {
    const int N = T::N;
    for (i64 i = 0; i < 2 * h; i += 2 * N) {
        const vf n0 = (T::vld(px + i) * rstd) * vload(W + i);
        const vf n1 = (T::vld(px + i + N) * rstd) * vload(W + i + N);
        const vf y0 = n0 * vload(cc + i) + pair_swap(n0) * vload(ss + i);
        const vf y1 = n1 * vload(cc + i + N) + pair_swap(n1) * vload(ss + i + N);
        if (RAW || !__builtin_expect(any_nan(y0, y1), 0)) {
            T::vst_raw(po + i, y0);
            T::vst_raw(po + i + N, y1);
        } else {
            T::vst(po + i, y0);
            T::vst(po + i + N, y1);
        }
    }
    for (i64 i = 2 * h; i < d; i += N) {
        const vf y = (T::vld(px + i) * rstd) * vload(W + i);
        if (RAW)
            T::vst_raw(po + i, y);
        else
            T::vst(po + i, y);
    }
}
// canon() changes only NaNs, and a row's outputs are all finite, without looking at them, when
//   - its inverse RMS is finite and positive (finite_rstd), so its sum of squares is finite:
//     then x is finite and |x·rstd| < 2^21 (for
//     |x_i| whose square does not underflow, sum >= x_i²(1 - u) as the sum of non-negative
//     terms is monotone, so |x_i|·rstd <= sqrt(d)(1 + 5u) with d < 2^40; for smaller |x_i|,
//     rstd finite means sum/d + eps >= the least subnormal: |x_i|·rstd < 2^-62 · 2^75 in float32,
//     2^-511 · 2^538 in float64),
//   - the weights (once per call) and the row's cos/sin (once per run of rows sharing it) are finite and
//     below 2^40 in magnitude (finite_below's default bound):
// then every product is below 2^21 · 2^40 · 2^40 · 4 and no operation meets a NaN, an overflow,
// inf - inf or 0·inf. Such rows skip the compare and blend of every stored vector (~1/6 of a
// float32 row's vector arithmetic at d = 128; more at the portable level, where SSE2 blends
// with three instructions: the fused forward at 1.40-1.43 `copy_` without it, 1.17-1.21 with).
template <typename C>
static inline bool finite_below(const C* p, i64 n, C lim = C(1099511627776.0)) {  // every |p[i]| < lim (2^40)
    typedef C VC __attribute__((vector_size(RK_VB)));
    typedef decltype(VC{} < VC{}) VM;
    const i64 L = (i64)(RK_VB / sizeof(C));
    VM bad = {};  // lanes all-ones where a value is NaN or outside (-lim, lim)
    i64 i = 0;
    for (; i + L <= n; i += L) {
        VC v;
        memcpy(&v, p + i, sizeof v);
        bad |= ~((v < lim) & (v > -lim));
    }
    bool ok = !any((vu)bad);
    for (; i < n; ++i) ok = ok && p[i] < lim && p[i] > -lim;
    return ok;
}
// rstd = 1 / sqrt(sum/d + eps) is finite and positive exactly when sum/d + eps is finite and
// positive: then the sum of squares is finite too (an infinite or NaN sum gives 0 or NaN)
template <typename C>
static RK_INLINE bool finite_rstd(C rstd) { return rstd > C(0) && rstd - rstd == C(0); }

// Rows [r0, r1) on the fast path, RK_NORM_GROUP rows (a power of two) at a time: a group's
// inverse RMS is one vector sqrt/div, and its sums are formed while the group before it is
// written, a row of each at a time.
#define RK_NORM_GROUP 8
static_assert(RK_NORM_GROUP == 8, "sumsq16_x8 sums eight rows");
// Software prefetch into L1 of the rows two groups ahead, a row beside each output row. A
// group's sum must wait for its rows before its outputs can be formed, and those waiting
// instructions fill the out-of-order window: with rows in L2 (a decode step's q and k), the
// sum pass read them at about half the rate of the rotation alone; beyond the caches
// (prefill), few loads of later rows were in flight (1.7x the rotation's time before any
// prefetch). A prefetch never faults and changes no value.
static RK_INLINE void prefetch_row(const char* p, i64 bytes) {
    const char* e = p + bytes;
    for (p = (const char*)((uintptr_t)p & ~(uintptr_t)63); p < e; p += 64) __builtin_prefetch(p, 0, 3);
}
// rs[u] = 1 / sqrt(rs[u] / d + eps) for the RK_NORM_GROUP rows of a group, as one vector
// (correctly rounded division and square root: the bits of the scalar formula)
template <typename C>
static RK_INLINE void group_rstd(C* rs, C dd, C eps) {
    typedef C CG __attribute__((vector_size(RK_NORM_GROUP * sizeof(C))));
    CG v;
    memcpy(&v, rs, sizeof v);
    v = v / dd + eps;
    for (int u = 0; u < RK_NORM_GROUP; ++u) v[u] = sqrt(v[u]);
    v = C(1) / v;
    memcpy(rs, &v, sizeof v);
}
// The rows of one group: their offsets (from the walk) and sums, then inverse RMS.
template <typename C>
struct NormGroup {
    int m;
    i64 xo[RK_NORM_GROUP], oo[RK_NORM_GROUP], co[RK_NORM_GROUP], so[RK_NORM_GROUP];
    C rs[RK_NORM_GROUP];
    RK_INLINE int fill(Walk& w, i64 r, i64 r1) {  // rows [r, min(r + GROUP, r1)): returns m
        m = r1 - r < RK_NORM_GROUP ? (int)(r1 - r) : RK_NORM_GROUP;
        w.take(m, xo, oo, co, so);
        return m;
    }
    RK_INLINE void finish(C dd, C eps) {  // rs[0, m) hold the sums: the inverse RMS of the group
        for (int u = m; u < RK_NORM_GROUP; ++u) rs[u] = C(1);
        group_rstd(rs, dd, eps);
    }
};
// The fused forward's pipeline over rows [r0, r1) of x (X; es bytes per element, rows of rowb
// bytes), shared by its
// three row paths: groups of RK_NORM_GROUP rows in a ring of three — the group written (a),
// the next (summed beside it: `sums(g, par)` a whole group at once when X8, else `sum1(g, u,
// par)` one row beside each output row: each sum is a chain of dependent additions whose
// latency the independent output work hides), and the one after (filled, its rows prefetched
// into L1 beside a's outputs). `row(a, u, par)` writes row u of a (rows are disjoint: in place
// is safe); `par` alternates per group (which of two row buffers a path's sums fill). The
// first group is summed alone; R (if set) gets each row's inverse RMS.
template <bool X8, typename C, typename Sums, typename Sum1, typename Row>
static RK_INLINE void norm_groups(Walk& w, i64 r0, i64 r1, const char* X, i64 es, i64 rowb, C dd, C eps, C* R,
                                  Sums sums, Sum1 sum1, Row row) {
    NormGroup<C> g[3];
    if (r0 < r1) {
        g[0].fill(w, r0, r1);
        if constexpr (X8)
            sums(g[0], 0);
        else
            for (int u = 0; u < g[0].m; ++u) sum1(g[0], u, 0);
        g[0].finish(dd, eps);
        if (r0 + RK_NORM_GROUP < r1) g[1].fill(w, r0 + RK_NORM_GROUP, r1);
    }
    for (i64 r = r0, cur = 0, par = 0; r < r1; r += RK_NORM_GROUP, cur = cur == 2 ? 0 : cur + 1, par ^= 1) {
        const NormGroup<C>& a = g[cur];
        NormGroup<C>& nx = g[cur == 2 ? 0 : cur + 1];
        NormGroup<C>& nn = g[cur == 0 ? 2 : cur - 1];
        const bool more = r + RK_NORM_GROUP < r1;  // then this group is full: nx.m <= a.m
        const int ahead = r + 2 * RK_NORM_GROUP < r1 ? nn.fill(w, r + 2 * RK_NORM_GROUP, r1) : 0;
        if constexpr (X8)
            if (more) sums(nx, (int)par ^ 1);
        for (int u = 0; u < a.m; ++u) {
            if (u < ahead) prefetch_row(X + nn.xo[u] * es, rowb);
            if (!X8 && more && u < nx.m) sum1(nx, u, (int)par ^ 1);
            row(a, u, (int)par);
        }
        if (more) nx.finish(dd, eps);
        if (R != nullptr)
            for (int u = 0; u < a.m; ++u) R[r + u] = canon1(a.rs[u]);
    }
}
// A forward norm job's operands, typed: x and out in the storage type S; cos, sin, the
// formed weights and the inverse RMS (R, may be null) in the compute type C; d, the rotary
// half h, eps, and d as a C. Unpacked by the forward row paths with a structured binding.
template <typename S, typename C>
struct NormFwdArgs {
    const S* X;
    S* O;
    const C *CT, *ST, *W;
    C* R;
    i64 d, h;
    C eps, dd;
    explicit NormFwdArgs(const NJob& j)
        : X((const S*)(intptr_t)j.x), O((S*)(intptr_t)j.o), CT((const C*)(intptr_t)j.c),
          ST((const C*)(intptr_t)j.s), W((const C*)(intptr_t)j.w), R((C*)(intptr_t)j.rstd), d(j.d), h(j.half),
          eps((C)j.eps), dd((C)j.d) {}
};
template <typename T, int LAYOUT>
static void norm_fwd_fast_rows(const NJob& j, Walk& w, i64 r0, i64 r1) {
    typedef typename T::S S;
    typedef typename T::C C;
    const auto [X, O, CT, ST, W, R, d, h, eps, dd] = NormFwdArgs<S, C>(j);
    constexpr bool X8 = RK_SUMSQ_X8 && std::is_same<C, float>::value && (T::N == 16 || T::N == 8);
    // float32 / float64 storage: rows known finite are stored without canon (finite_below)
    constexpr bool RAW = std::is_same<S, C>::value;
    const bool wok = RAW && finite_below(W, d);
    const C *lc = nullptr, *ls = nullptr;
    int tok = 0;  // the table row lc/ls: 0 not checked, 1 finite and below 2^40, 2 not
    const i64 rowb = d * (i64)sizeof(S);
    // interleaved: the table row duplicated per pair for norm_fwd_row_il, built when a second
    // row uses it (the heads of a token; rows each on a new table row keep the shuffles)
    enum { IL = LAYOUT == 1 && FastRow<T>::value };
    alignas(64) float dc[IL ? 2 * PAIR_TAB_MAX : 1], ds[IL ? 2 * PAIR_TAB_MAX : 1];
    const C *dlc = nullptr, *dls = nullptr;
    bool dok = false;
    norm_groups<X8>(
        w, r0, r1, (const char*)X, (i64)sizeof(S), rowb, dd, eps, R,
        [&](auto& g, int) { sumsq16_x8<T>(X, g.xo, g.m, d, g.rs); },  // generic: instantiated only for X8
        [&](auto& g, int u, int) { g.rs[u] = sumsq16<T>(X + g.xo[u], d); },
        [&](const NormGroup<C>& a, int u, int) {
            const C *pc = CT + a.co[u], *ps = ST + a.so[u];
            bool il = false;
            if constexpr (IL) {
                if (h <= PAIR_TAB_MAX) {
                    if (pc != dlc || ps != dls)
                        dlc = pc, dls = ps, dok = false;
                    else {
                        if (!dok) il_tables((const float*)pc, (const float*)ps, 1.0f, h, dc, ds);
                        dok = il = true;
                    }
                }
            }
            if constexpr (RAW) {
                // a table row is checked when the next row uses it too (the heads of a token
                // sharing its row: bshd); where each row takes a new table row (bhsd) the
                // check would cost more than canon: those rows keep canon
                if (pc != lc || ps != ls)
                    lc = pc, ls = ps, tok = 0;
                else if (tok == 0)
                    tok = finite_below(pc, h) && finite_below(ps, h) ? 1 : 2;
            }
            auto emit = [&](auto raw) {  // raw: std::true_type when the row's outputs are known finite
                constexpr bool RW = decltype(raw)::value;
                if constexpr (IL)
                    if (il) {
                        norm_fwd_row_il<T, RW>(X + a.xo[u], O + a.oo[u], dc, ds, W, h, d, a.rs[u]);
                        return;
                    }
                norm_fwd_row_fast<T, LAYOUT, RW>(X + a.xo[u], O + a.oo[u], pc, ps, W, h, d, a.rs[u]);
            };
            if constexpr (RAW)
                if (wok && tok == 1 && finite_rstd(a.rs[u])) {
                    emit(std::true_type());
                    return;
                }
            emit(std::false_type());
        });
}

// The paired fused paths run on rows whose width and rotary half split into whole 2·NF-blocks
// (d a multiple of 16 for dot16) and fit the per-call buffers.
template <int LAYOUT>
static inline bool pair_rows_ok(i64 d, i64 h) {
    return d % 16 == 0 && d % (2 * NF) == 0 && h % (LAYOUT == 0 ? 2 * NF : NF) == 0 && d <= PAIR_TAB_MAX;
}

// d floats split even/odd per 2·NF-block (lanes e at i, o at i + NF): a into out
static inline void pair_split(const float* a, float* out, i64 d) {
    for (i64 i = 0; i < d; i += 2 * NF) {
        vf e, o;
        deint(vload(a + i), vload(a + i + NF), e, o);
        memcpy(out + i, &e, sizeof e);
        memcpy(out + i + NF, &o, sizeof o);
    }
}

// the inverse: a row split by pair_split back into element order, in place
static inline void pair_unsplit(float* a, i64 d) {
    for (i64 i = 0; i < d; i += 2 * NF) {
        vf v0, v1;
        inter(vload(a + i), vload(a + i + NF), v0, v1);
        memcpy(a + i, &v0, sizeof v0);
        memcpy(a + i + NF, &v1, sizeof v1);
    }
}

// The paired types (pair_tables above) on the fast path: rows split into even and odd
// elements, the weights split once per call and each table row once per token. The sums of
// squares keep dot16's lanes: even lane l of a 2·NF-block is element 2l, odd lane l element
// 2l + 1, interleaved back into the 16 partial sums for tree16 (with 16 lanes, NF = 16, a
// split spans two 16-blocks: sumsq16 instead). The same operations in the same order as the
// generic path: the same bits.
template <typename T, bool EXACT = true>
static inline float pair_sumsq16(const uint16_t* px, i64 d, float* xb = nullptr) {
    // xb (float16 without F16C): the row's split values (even lanes at i, odd at i + NF per
    // 2·NF-block) are kept there for the output pass, exact (the exact pass rewrites them)
    if constexpr (NF > 8) {
        return sumsq16<T>(px, d);
    } else {
        typedef typename T::P P;
        enum { U = 8 / NF };
        vf ae[U], ao[U];
        memset(ae, 0, sizeof ae);
        memset(ao, 0, sizeof ao);
        vu bad = {};
        for (i64 i = 0; i < d; i += 16)
            for (int u = 0; u < U; ++u) {
                vf e, o;
                if (EXACT)
                    P::split(px + i + u * 2 * NF, e, o);
                else
                    P::split_fast(px + i + u * 2 * NF, e, o, bad);
                if (xb != nullptr) {
                    memcpy(xb + i + u * 2 * NF, &e, sizeof e);
                    memcpy(xb + i + u * 2 * NF + NF, &o, sizeof o);
                }
                ae[u] += e * e;
                ao[u] += o * o;
            }
        if (!EXACT && P::FAST && any(bad)) return pair_sumsq16<T, true>(px, d, xb);  // the row again, exactly
        vf acc[2 * U];
        for (int u = 0; u < U; ++u) inter(ae[u], ao[u], acc[2 * u], acc[2 * u + 1]);
        return tree16<vf, float, NF>(acc);
    }
}

// the conversions of a block: exact, cheap (normal values; others flagged), or (float16)
// cheap with the rotation's narrowing for results known below 65504 (others flagged)
struct Exact { static constexpr int value = 1; };
struct Cheap { static constexpr int value = 0; };
struct Bounded { static constexpr int value = 2; };

template <typename T, int LAYOUT>
static void norm_fwd_pair_rows(const NJob& j, Walk& w, i64 r0, i64 r1) {
    typedef typename T::P P;
    const auto [X, O, CT, ST, W, R, d, h, eps, dd] = NormFwdArgs<uint16_t, float>(j);
    // 16 lanes: pair_sumsq16 is sumsq16 (T::vld widens a bfloat16 exactly)
    constexpr bool X8 = RK_SUMSQ_X8 && (NF == 16 || NF == 8) && !T::P::FAST;
    // float16 without F16C: the sum pass keeps each row's widened values (split even/odd) for
    // the output pass, which then neither converts nor checks x again
    constexpr bool BUF = P::FAST;
    // (this group's rows and the next's, row u at u·ld: see norm_fwd_bf16_el_rows)
    const i64 ld = d + 16;
    alignas(64) float xbuf[BUF ? 2 : 1][BUF ? RK_NORM_GROUP * (PAIR_TAB_MAX + 16) : 1];
    auto rowbuf = [&](int grp, int u) -> float* { return BUF ? xbuf[grp] + u * ld : nullptr; };
    alignas(64) float wb[PAIR_TAB_MAX];  // the weights split even/odd per 2·NF-block
    alignas(64) float cb[PAIR_TAB_MAX], sb[PAIR_TAB_MAX];
    pair_split(W, wb, d);
    const float *lc = nullptr, *ls = nullptr;
    // float16 (P::FAST): a row whose results are known below 65504 in magnitude narrows them
    // with the rotation's rot_out (no overflow test; results below 2^-14 still redone
    // exactly): its inverse RMS finite and positive (finite_rstd: |x·rstd| <= sqrt(d)(1 + 5u),
    // see finite_below), the weights below 65504 / (4·sqrt(d)) and |c| + |s| < 3.99 for every
    // pair of its table row (pair_tables), so |y| <= sqrt(d)(1 + 5u)·|w|·3.99·(1 + u)^4 < 65504
    // (the 3.99 / 4 margin covers the roundings of the products and sums)
    const bool wsmall = P::FAST && finite_below(W, d, 65504.0f / (4.0f * std::sqrt((float)d)));
    bool tsmall = false;
    // par (norm_groups): which float16 row buffer a group's sums fill (this group's / the next's)
    norm_groups<X8>(
        w, r0, r1, (const char*)X, (i64)sizeof(uint16_t), d * (i64)sizeof(uint16_t), dd, eps, R,
        [&](auto& g, int) { sumsq16_x8<T>(X, g.xo, g.m, d, g.rs); },  // generic: instantiated only for X8
        [&](auto& g, int u, int par) { g.rs[u] = pair_sumsq16<T, false>(X + g.xo[u], d, rowbuf(par, u)); },
        [&](const NormGroup<float>& a, int u, int par) {
            const float *pc = CT + a.co[u], *ps = ST + a.so[u];
            if (pc != lc || ps != ls) {
                tsmall = pair_tables<LAYOUT>(pc, ps, 1.0f, 1.0f, h, cb, sb);
                lc = pc, ls = ps;
            }
            const uint16_t* px = X + a.xo[u];
            uint16_t* po = O + a.oo[u];
            const float rv = a.rs[u];
            const float* xr = rowbuf(par, u);
            // the cheap conversions of normal values first (P::FAST); a block with any other
            // value is formed again with the exact ones before it is stored (in place is safe)
            auto norm = [&](i64 i, vf& e, vf& o, vu& bad, auto exact) {  // elements [i, i + 2·NF)
                if constexpr (BUF) {
                    e = vload(xr + i);  // exact values from the sum pass
                    o = vload(xr + i + NF);
                } else if constexpr (decltype(exact)::value == 1)
                    P::split(px + i, e, o);
                else
                    P::split_fast(px + i, e, o, bad);
                e = (e * rv) * vload(wb + i);
                o = (o * rv) * vload(wb + i + NF);
            };
            auto join = [&](vf e, vf o, vu& bad, auto exact) {
                if constexpr (decltype(exact)::value == 1)
                    return P::join(e, o);
                else if constexpr (decltype(exact)::value == 2) {  // Bounded
                    vf mn;
                    const vu r = P::rot_out(e, o, mn);
                    P::rot_check(mn, bad);
                    return r;
                } else
                    return P::join_fast(e, o, bad);
            };
            auto half_blk = [&](i64 i, vu& bad, vu& r1, vu& r2, auto exact) {
                vf ae, ao, be, bo;
                norm(i, ae, ao, bad, exact);
                norm(h + i, be, bo, bad, exact);
                const vf ce = vload(cb + i), cq = vload(cb + i + NF), se = vload(sb + i), sq = vload(sb + i + NF);
                r1 = join(ae * ce - be * se, ao * cq - bo * sq, bad, exact);
                r2 = join(be * ce + ae * se, bo * cq + ao * sq, bad, exact);
            };
            auto il_blk = [&](i64 i, vu& bad, auto exact) {  // elements [2i, 2i + 2·NF): pairs i .. i + NF - 1
                vf a, b;
                norm(2 * i, a, b, bad, exact);
                const vf c = vload(cb + i), s = vload(sb + i);
                return join(a * c - b * s, b * c + a * s, bad, exact);
            };
            auto tail_blk = [&](i64 i, vu& bad, auto exact) {
                vf e, o;
                norm(i, e, o, bad, exact);
                return join(e, o, bad, exact);
            };
            const Exact yes;
            auto blocks = [&](auto no) {  // the row, cheap conversions `no` first
                if (LAYOUT == 0) {
                    for (i64 i = 0; i < h; i += 2 * NF) {
                        vu bad = {}, r1, r2;
                        half_blk(i, bad, r1, r2, no);
                        if ((P::FAST || P::ROT_FAST) && any(bad)) half_blk(i, bad, r1, r2, yes);
                        pair_store<0>(po + i, r1);
                        pair_store<0>(po + h + i, r2);
                    }
                } else {
                    for (i64 i = 0; i < h; i += NF) {
                        vu bad = {};
                        vu r = il_blk(i, bad, no);
                        if ((P::FAST || P::ROT_FAST) && any(bad)) r = il_blk(i, bad, yes);
                        pair_store<0>(po + 2 * i, r);
                    }
                }
                for (i64 i = 2 * h; i < d; i += 2 * NF) {
                    vu bad = {};
                    vu r = tail_blk(i, bad, no);
                    if ((P::FAST || P::ROT_FAST) && any(bad)) r = tail_blk(i, bad, yes);
                    pair_store<0>(po + i, r);
                }
            };
            if constexpr (P::FAST) {
                if (wsmall && tsmall && finite_rstd(rv))
                    blocks(Bounded());
                else
                    blocks(Cheap());
            } else
                blocks(Cheap());
        });
}

#ifdef RK_BF16_CVT
// bfloat16 at the avx512bf16 level, half layout, h and d multiples of 32: element order
// throughout. The sum pass (sumsq16_x8) keeps each row's widened values in a per-thread
// buffer; the output pass reads them, and narrows 32 results at a time with one VCVTNE2PS2BF16
// in element order. Against the paired path this drops the even/odd split of x, the split
// tables and the interleaving permute of every join (6 of ~47 vector instructions per 64
// elements). The same operations per element as every other path (the same products, the
// same rotation, round to nearest even; a block with a NaN or subnormal result narrowed by
// the formula): the same bits.
static inline bool norm_el_rows_ok(i64 d, i64 h) { return h % 32 == 0 && d % 32 == 0 && d <= PAIR_TAB_MAX; }
static RK_INLINE void bf16_store2(uint16_t* p, vf lo, vf hi) {  // p[0, 32) = lo, hi rounded
    __m512i r;
    if (__builtin_expect(bf16_cvt_ok(lo, hi), 1))
        r = (__m512i)_mm512_cvtne2ps_pbh((__m512)hi, (__m512)lo);
    else
        r = _mm512_inserti64x4(_mm512_castsi256_si512(_mm512_cvtepi32_epi16((__m512i)(bf16_round_hi(lo) >> 16))),
                               _mm512_cvtepi32_epi16((__m512i)(bf16_round_hi(hi) >> 16)), 1);
    memcpy(p, &r, sizeof r);
}
static void norm_fwd_bf16_el_rows(const NJob& j, Walk& w, i64 r0, i64 r1) {
    typedef BF16 T;
    const auto [X, O, CT, ST, W, R, d, h, eps, dd] = NormFwdArgs<uint16_t, float>(j);
    // this group's rows and the next's (par), row u at u·ld: packed with a 64-byte gap, not
    // PAIR_TAB_MAX apart (rows 4 KiB apart share their L1 sets, and a load from one is
    // checked against stores to another as if they overlapped: 4K aliasing)
    const i64 ld = d + 16;
    alignas(64) float xbuf[2][RK_NORM_GROUP * (PAIR_TAB_MAX + 16)];
    norm_groups<true>(
        w, r0, r1, (const char*)X, (i64)sizeof(uint16_t), d * (i64)sizeof(uint16_t), dd, eps, R,
        [&](NormGroup<float>& g, int par) { sumsq16_x8<T>(X, g.xo, g.m, d, g.rs, xbuf[par], ld); },
        [&](NormGroup<float>&, int, int) {},  // X8 only
        [&](const NormGroup<float>& a, int u, int par) {
            const float *xr = xbuf[par] + u * ld, *pc = CT + a.co[u], *ps = ST + a.so[u];
            uint16_t* po = O + a.oo[u];
            const float rv = a.rs[u];
            for (i64 i = 0; i < h; i += 32) {
                const vf a0 = (vload(xr + i) * rv) * vload(W + i);
                const vf a1 = (vload(xr + i + 16) * rv) * vload(W + i + 16);
                const vf b0 = (vload(xr + h + i) * rv) * vload(W + h + i);
                const vf b1 = (vload(xr + h + i + 16) * rv) * vload(W + h + i + 16);
                const vf c0 = vload(pc + i), c1 = vload(pc + i + 16), s0 = vload(ps + i), s1 = vload(ps + i + 16);
                bf16_store2(po + i, a0 * c0 - b0 * s0, a1 * c1 - b1 * s1);
                bf16_store2(po + h + i, b0 * c0 + a0 * s0, b1 * c1 + a1 * s1);
            }
            for (i64 i = 2 * h; i < d; i += 32)
                bf16_store2(po + i, (vload(xr + i) * rv) * vload(W + i), (vload(xr + i + 16) * rv) * vload(W + i + 16));
        });
}
#endif

template <typename T, int LAYOUT>
static void norm_fwd_rows(const NJob& j, i64 r0, i64 r1) {
    typedef typename T::S S;
    typedef typename T::C C;
    typedef typename CompT<C>::T Fc;
    const auto [X, O, CT, ST, W, R, d, h, eps, dd] = NormFwdArgs<S, C>(j);
    const i64 n = pad16(d);
    Walk w(j.nd, j.size, j.xs, j.os, j.cs, j.ss, j.gs, r0);
    if constexpr (Paired<T>::value) {
#ifdef RK_BF16_CVT
        if (IsBF16<T>::value && LAYOUT == 0 && norm_el_rows_ok(d, h)) {
            norm_fwd_bf16_el_rows(j, w, r0, r1);
            return;
        }
#endif
        if (pair_rows_ok<LAYOUT>(d, h)) {
            norm_fwd_pair_rows<T, LAYOUT>(j, w, r0, r1);
            return;
        }
    }
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
        if (R != nullptr) R[r] = canon1(rstd);
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

// The backward of one row for the paired types (bfloat16, and float16 converted in integer
// lanes) with up to 8 float lanes: the operations of norm_bwd_row_fast on the rows split
// even/odd per 2·NF-block (as the forward's paired path), 2·NF values per load and store
// instead of NF: tables split by pair_tables (sine negated: rot(-θ)), weights split once per
// call, the weight-gradient sums `acc` kept split (put back in element order by pair_unsplit
// when the block of rows is done), v and x̂ buffered split, and dot16's 16 lanes rebuilt from
// the split sums (element 16k + j always lands in lane j, in the same order: the same bits).
// Loads of normal values take split_fast, a block with any other value the exact split;
// results are narrowed with join_fast, a block outside the float16 normal range with the
// exact join. (With 16 lanes a 2·NF-block spans two of dot16's 16-element steps;
// re-interleaving each block's products keeps the bits there, but measured no faster than the
// element-order path at the avx512 levels, so those levels keep it.)
template <typename T, int LAYOUT>
static inline void norm_bwd_row_pair(const uint16_t* pg, const uint16_t* px, uint16_t* po, const float* cb,
                                     const float* sb, const float* wb, float* acc, float rstd, i64 h, i64 d, float* vb,
                                     float* xb) {
    typedef typename T::P P;
    auto put = [&](i64 i, vf ue, vf uo, vf xe, vf xo) {  // the split block at element i
        const vf he = xe * rstd, ho = xo * rstd;
        if (acc != nullptr) {
            const vf ae = vload(acc + i) + ue * he, ao = vload(acc + i + NF) + uo * ho;
            memcpy(acc + i, &ae, sizeof ae);
            memcpy(acc + i + NF, &ao, sizeof ao);
        }
        const vf ve = ue * vload(wb + i), vo = uo * vload(wb + i + NF);
        memcpy(vb + i, &ve, sizeof ve);
        memcpy(vb + i + NF, &vo, sizeof vo);
        memcpy(xb + i, &he, sizeof he);
        memcpy(xb + i + NF, &ho, sizeof ho);
    };
    auto load = [&](const uint16_t* p0, const uint16_t* p1, vf& e0, vf& o0, vf& e1, vf& o1) {
        vu bad = {};
        P::split_fast(p0, e0, o0, bad);
        P::split_fast(p1, e1, o1, bad);
        if (any(bad)) {
            P::split(p0, e0, o0);
            P::split(p1, e1, o1);
        }
    };
    if (LAYOUT == 0) {
        for (i64 i = 0; i < h; i += 2 * NF) {
            vf gae, gao, gbe, gbo, xae, xao, xbe, xbo;
            load(pg + i, pg + h + i, gae, gao, gbe, gbo);
            load(px + i, px + h + i, xae, xao, xbe, xbo);
            const vf ce = vload(cb + i), co = vload(cb + i + NF), se = vload(sb + i), so = vload(sb + i + NF);
            put(i, gae * ce - gbe * se, gao * co - gbo * so, xae, xao);
            put(h + i, gbe * ce + gae * se, gbo * co + gao * so, xbe, xbo);
        }
    } else {
        for (i64 i = 0; i < h; i += NF) {  // elements [2i, 2i + 2·NF): pairs i .. i + NF - 1
            vf ge, go, xe, xo;
            load(pg + 2 * i, px + 2 * i, ge, go, xe, xo);
            const vf c = vload(cb + i), s = vload(sb + i);
            put(2 * i, ge * c - go * s, go * c + ge * s, xe, xo);
        }
    }
    for (i64 i = 2 * h; i < d; i += 2 * NF) {
        vf ge, go, xe, xo;
        load(pg + i, px + i, ge, go, xe, xo);
        put(i, ge, go, xe, xo);
    }
    enum { U = 8 / NF };
    vf ae[U], ao[U];
    memset(ae, 0, sizeof ae);
    memset(ao, 0, sizeof ao);
    for (i64 i = 0; i < d; i += 16)
        for (int u = 0; u < U; ++u) {
            const i64 k = i + u * 2 * NF;
            ae[u] += vload(vb + k) * vload(xb + k);
            ao[u] += vload(vb + k + NF) * vload(xb + k + NF);
        }
    vf lanes[2 * U];
    for (int u = 0; u < U; ++u) inter(ae[u], ao[u], lanes[2 * u], lanes[2 * u + 1]);
    const float cc = tree16<vf, float, NF>(lanes) / (float)d;
    for (i64 i = 0; i < d; i += 2 * NF) {
        const vf ye = (vload(vb + i) - vload(xb + i) * cc) * rstd;
        const vf yo = (vload(vb + i + NF) - vload(xb + i + NF) * cc) * rstd;
        vu bad = {};
        vu r = P::join_fast(ye, yo, bad);
        if (any(bad)) r = P::join(ye, yo);
        pair_store<0>(po + i, r);
    }
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
    if constexpr (Paired<T>::value && NF <= 8) {
        if (pair_rows_ok<LAYOUT>(d, h)) {
            alignas(64) float wb[PAIR_TAB_MAX], cb[PAIR_TAB_MAX], sb[PAIR_TAB_MAX];
            pair_split(W, wb, d);  // the weights split even/odd per 2·NF-block
            const float *lc = nullptr, *ls = nullptr;
            for (i64 r = r0; r < r1; ++r, w.next()) {
                if (DW != nullptr && r % RK_NORM_BLOCK == 0) {
                    acc = DW + (r / RK_NORM_BLOCK) * d;
                    for (i64 i = 0; i < d; ++i) acc[i] = 0;
                }
                const float *pc = CT + w.c, *ps = ST + w.s;
                if (pc != lc || ps != ls) {
                    pair_tables<LAYOUT>(pc, ps, -1.0f, 1.0f, h, cb, sb);
                    lc = pc, ls = ps;
                }
                norm_bwd_row_pair<T, LAYOUT>((const uint16_t*)(G + w.e), (const uint16_t*)(X + w.x),
                                             (uint16_t*)(O + w.o), cb, sb, wb, acc, R[r], h, d, gb, xb);
                if (acc != nullptr && ((r + 1) % RK_NORM_BLOCK == 0 || r + 1 == r1)) {
                    pair_unsplit(acc, d);  // element order, NaN canonical: the block's sums are final
                    for (i64 i = 0; i < d; ++i) acc[i] = canon1(acc[i]);
                }
            }
            return;
        }
    }
    for (i64 r = r0; r < r1; ++r, w.next()) {
        if (DW != nullptr && r % RK_NORM_BLOCK == 0) {
            acc = DW + (r / RK_NORM_BLOCK) * d;
            for (i64 i = 0; i < d; ++i) acc[i] = 0;
        }
        // a block's weight-gradient sums are final after its last row: NaN made canonical there
        const bool last = acc != nullptr && ((r + 1) % RK_NORM_BLOCK == 0 || r + 1 == r1);
        if (fast) {
            norm_bwd_row_fast<T, LAYOUT>(G + w.e, X + w.x, O + w.o, CT + w.c, ST + w.s, W, acc, R[r], h, d, gb, xb);
            if (last)
                for (i64 i = 0; i < d; ++i) acc[i] = canon1(acc[i]);
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
        if (last)
            for (i64 i = 0; i < d; ++i) acc[i] = canon1(acc[i]);
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

// cos and sin of float64 angles (the tables' cos_sin op), element by element, from IEEE
// double additions and multiplications only (-ffp-contract=off: no fused multiply-add), so
// the same bits at every level and vector width, in every thread split, on every machine;
// lanes the reduction below does not cover take the C library's cos/sin (deterministic too).
// Accuracy: within 1 ulp of float64 (the C library's differs from it by at most 1 ulp in ~2%
// of values; rounded to float32 the two agreed on every one of 2M test angles).
namespace trig {
// pi/2 = P1 + P2 + P3 + 1.0e-37, P1 and P2 of 33 bits each (k·P1 and k·P2 are exact for
// |k| < 2^20); derived from pi to 400 bits (Machin's formula in integer arithmetic)
constexpr double P1 = 0x1.921fb544p+0, P2 = 0x1.0b4611a6p-34, P3 = 0x1.3198a2e037073p-69;
constexpr double TWO_OVER_PI = 0x1.45f306dc9c883p-1;
constexpr double SHIFTER = 0x1.8p52;  // v + SHIFTER holds round(v) in its low bits
constexpr double LIMIT = 1.6e6;       // |x| below it: |k| < 2^20
// Taylor coefficients (-1)^n / (2n + 1)! and (-1)^n / (2n)!, rounded to double; the first
// omitted terms are below 1e-19 of the result for |r| <= pi/4
constexpr double S3 = -0x1.5555555555555p-3, S5 = 0x1.1111111111111p-7, S7 = -0x1.a01a01a01a01ap-13,
                 S9 = 0x1.71de3a556c734p-19, S11 = -0x1.ae64567f544e4p-26, S13 = 0x1.6124613a86d09p-33,
                 S15 = -0x1.ae7f3e733b81fp-41, S17 = 0x1.952c77030ad4ap-49, S19 = -0x1.2f49b46814157p-57;
constexpr double C4 = 0x1.5555555555555p-5, C6 = -0x1.6c16c16c16c17p-10, C8 = 0x1.a01a01a01a01ap-16,
                 C10 = -0x1.27e4fb7789f5cp-22, C12 = 0x1.1eed8eff8d898p-29, C14 = -0x1.93974a8c07c9dp-37,
                 C16 = 0x1.ae7f3e733b81fp-45, C18 = -0x1.6827863b97d97p-53;
enum { W = ND };  // the level's double lanes: the same operations per lane at every width
typedef vd V;
typedef int64_t I __attribute__((vector_size(RK_VB)));

// W angles -> sin, cos; returns all-ones in the lanes that need the C library: |x| >= LIMIT,
// infinity, NaN, or a reduced angle below 2^-30 (where the reduction's absolute error of
// ~2^-100 would be a larger relative one)
static inline I sincos(V x, V& s_out, V& c_out) {
    const V y = x * TWO_OVER_PI + SHIFTER;
    const V kd = y - SHIFTER;  // k = round(x·2/pi)
    I q;
    memcpy(&q, &y, sizeof q);  // k in the low bits (two's complement)
    // r = x - k·pi/2 as hi + lo: x - k·P1 is exact (Sterbenz), t - k·P2 by TwoSum
    const V t = x - kd * P1, w = kd * P2;
    const V r1 = t - w;
    const V bb = r1 - t, e1 = (t - (r1 - bb)) + (-w - bb);
    const V tail = e1 - kd * P3;
    const V hi = r1 + tail, lo = (r1 - hi) + tail;
    // sin(hi + lo) = sin(hi) + lo·cos(hi), cos(hi + lo) = cos(hi) - lo·sin(hi), |hi| <= pi/4
    const V z = hi * hi, v = z * hi;
    const V ps = S3 + z * (S5 + z * (S7 + z * (S9 + z * (S11 + z * (S13 + z * (S15 + z * (S17 + z * S19)))))));
    const V sn = hi + (v * ps + (lo - 0.5 * z * lo));
    const V pc = C4 + z * (C6 + z * (C8 + z * (C10 + z * (C12 + z * (C14 + z * (C16 + z * C18))))));
    const V hz = 0.5 * z, wv = 1.0 - hz;
    const V cs = wv + (((1.0 - wv) - hz) + (z * (z * pc) - hi * lo));  // 1 - hz's rounding error kept
    // quadrant k mod 4: (sin, cos) = (s, c), (c, -s), (-s, -c), (-c, s)
    const I odd = -(q & 1);
    I si, ci;
    memcpy(&si, &sn, sizeof si);
    memcpy(&ci, &cs, sizeof ci);
    I a = (ci & odd) | (si & ~odd), b = (si & odd) | (ci & ~odd);
    a ^= (q & 2) << 62;
    b ^= ((q + 1) & 2) << 62;
    memcpy(&s_out, &a, sizeof a);
    memcpy(&c_out, &b, sizeof b);
    I ax, ah;
    memcpy(&ax, &x, sizeof ax);
    memcpy(&ah, &hi, sizeof ah);
    const double lim = LIMIT, tiny = 0x1p-30;
    int64_t lb, tb;
    memcpy(&lb, &lim, 8);
    memcpy(&tb, &tiny, 8);
    return ((ax & INT64_MAX) >= lb) | ((ah & INT64_MAX) < tb);  // NaN and infinity: above LIMIT
}
}  // namespace trig

static void sincos_range(const double* x, double* s, double* c, i64 n) {
    for (i64 i = 0; i < n; i += trig::W) {
        const i64 m = n - i < trig::W ? n - i : (i64)trig::W;
        trig::V v = {}, sv, cv;  // the last block zero padded
        memcpy(&v, x + i, (size_t)m * sizeof(double));
        const trig::I lib = trig::sincos(v, sv, cv);
        if (m == trig::W && !any((vu)lib)) {
            memcpy(s + i, &sv, sizeof sv);
            memcpy(c + i, &cv, sizeof cv);
            continue;
        }
        for (i64 u = 0; u < m; ++u) {
            s[i + u] = lib[u] ? sin(x[i + u]) : sv[u];
            c[i + u] = lib[u] ? cos(x[i + u]) : cv[u];
        }
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

void RK_CAT(rk_sincos_, RK_LEVEL)(const double* x, double* s, double* c, i64 n) { sincos_range(x, s, c, n); }

}  // extern "C"
