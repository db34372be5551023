// ropekit CPU rotary kernel: the interface between the operator layer (ops.cpp, torch
// headers) and the SIMD math (kernel.cpp, plain C++ compiled once per instruction-set level).
//
// ops.cpp validates the tensors, normalises each one into an RkJob (rows of d elements over
// at most RK_MAXD leading dims, every operand addressed through element strides) and splits
// the rows of all jobs over torch's thread pool (at::parallel_for); each thread calls the
// level's rk_rows_* on its range of rows.
#pragma once
#include <stdint.h>

#define RK_MAXD 8

// One tensor to rotate: out = rot(x) with half-width cos/sin rows taken either through the
// table strides (cs/ss: zero = broadcast) or through a position index into a contiguous
// [ntable, half] table (gather: ps strides into the int64 positions).
typedef struct RkJob {
    int64_t dtype;   // 0 float32, 1 bfloat16, 2 float16, 3 float64
    int64_t layout;  // 0 half (i, i + r/2), 1 interleaved (2i, 2i + 1)
    int64_t conj;    // 1: rotate by -theta (sin -> -sin)
    int64_t gather;  // 1: table rows come from pos[], else from the cos/sin strides
    int64_t half;    // r/2
    int64_t d;       // head dim (elements past r are copied when out != x)
    int64_t x, o, c, s, pos;  // addresses
    int64_t npos, ntable;     // positions count, table rows (gather only)
    int64_t nd;               // leading (row) dims after normalisation, >= 1
    int64_t nrows;
    int64_t nt;  // 1: non-temporal stores (set by rk_finish_*)
    int64_t size[RK_MAXD];
    int64_t xs[RK_MAXD], os[RK_MAXD], cs[RK_MAXD], ss[RK_MAXD], ps[RK_MAXD];  // element strides
} RkJob;

// One tensor of a fused per-head RMSNorm + rotation (forward) or of its backward.
// Forward: out = rot(x * rstd * w), rstd = 1 / sqrt(mean(x^2) + eps) over the d elements of
// each row, written to rstd[row] (row = the flat index over x.shape[:-1]).
// Backward: x, g (the gradient of out), rstd from the forward; out = dx; when dwp != 0 the
// weight-gradient partial sums of rows [k * RK_NORM_BLOCK, (k + 1) * RK_NORM_BLOCK) go to
// dwp[k * d .. k * d + d) (compute type), summed by the caller in a fixed order.
#define RK_NORM_BLOCK 64
typedef struct RkNormJob {
    int64_t dtype;   // 0 float32, 1 bfloat16, 2 float16, 3 float64 (x, out, g)
    int64_t layout;  // 0 half, 1 interleaved
    int64_t half;    // r/2
    int64_t d;       // head dim (the norm's width)
    double eps;
    int64_t x, o, c, s, w, rstd, g, dwp;  // addresses; w, rstd, dwp, c, s in the compute type
    int64_t nd, nrows;
    int64_t size[RK_MAXD];
    int64_t xs[RK_MAXD], os[RK_MAXD], cs[RK_MAXD], ss[RK_MAXD], gs[RK_MAXD];  // element strides
} RkNormJob;

#ifdef __cplusplus
extern "C" {
#endif

// One set per level: default (the compiler's baseline), avx2 (AVX2 + FMA + F16C), avx512
// (AVX-512 F/BW/VL/DQ), avx512bf16 (avx512 + AVX512_BF16: the float32 -> bfloat16 narrowing
// in one instruction where no subnormal or NaN is involved). Every level computes the same
// bits (-ffp-contract=off).
#define RK_DECLARE_LEVEL(L)                                                                  \
    /* bit 0: float16 compiled in */                                                         \
    int rk_features_##L(void);                                                               \
    /* choose streaming stores per job (out != x, large, aligned); bytes = all jobs' bytes */ \
    void rk_finish_##L(RkJob* jobs, int64_t njobs, int64_t bytes, int64_t nt_bytes);         \
    /* rows [g0, g1) of the jobs' concatenated rows */                                       \
    void rk_rows_##L(const RkJob* jobs, int64_t njobs, int64_t g0, int64_t g1);                \
    /* norm + rotation forward: rows [g0, g1) of the jobs' concatenated rows */               \
    void rk_norm_fwd_##L(const RkNormJob* jobs, int64_t njobs, int64_t g0, int64_t g1);       \
    /* backward: blocks [b0, b1) of the jobs' concatenated RK_NORM_BLOCK-row blocks */        \
    void rk_norm_bwd_##L(const RkNormJob* jobs, int64_t njobs, int64_t b0, int64_t b1);       \
    /* s[i] = sin(x[i]), c[i] = cos(x[i]) for i < n, float64: the same bits at every level */ \
    void rk_sincos_##L(const double* x, double* s, double* c, int64_t n);

RK_DECLARE_LEVEL(default)
#if defined(__x86_64__) || defined(_M_X64)
RK_DECLARE_LEVEL(avx2)
RK_DECLARE_LEVEL(avx512)
RK_DECLARE_LEVEL(avx512bf16)
#endif

#ifdef __cplusplus
}
#endif
