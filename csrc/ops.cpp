// ropekit's operators in the PyTorch dispatcher (torch.ops.ropekit.*).
//
// Schemas (TORCH_LIBRARY below): one op per operation, with an in-place variant whose
// mutated arguments carry alias annotations (Tensor(a!)) and an out= variant:
//
//   rotary(x, cos, sin, layout, conjugate) -> y             y = R(θ) x  (R(-θ) when conjugate)
//   rotary_(x!, cos, sin, layout, conjugate) -> ()          in place
//   rotary_out(x, cos, sin, layout, conjugate, *, out!)     into a preallocated out
//   rotary_qk(q, k, cos, sin, layout, conjugate) -> (q', k') q and k with the same tables, one pass
//   rotary_qk_(q!, k!, cos, sin, layout, conjugate) -> ()
//   rotary_gather(q, k, cos_table, sin_table, positions, format, layout, conjugate) -> (q', k')
//   rotary_gather_(q!, k!, ...) -> ()                       table rows picked by position
//   cpu_capability() -> str                                 the instruction-set level in use
//
// Per dispatch key:
//   CPU              the fused kernel (kernel.cpp, one build per instruction-set level),
//                    rows split over torch's own thread pool (at::parallel_for)
//   Meta/fake        registered from Python (ropekit/ops.py: torch.library.register_fake), so
//                    symbolic shapes of torch.compile(dynamic=True) and export stay symbolic
//   ADInplaceOrView  the version-counter bump of the mutated tensors
//   Autograd         backward = the same op with the rotation conjugated (R(θ)ᵀ = R(-θ));
//                    only the tables (and positions) are saved, never activations
//
// Every check of the input happens here (TORCH_CHECK_VALUE: a ValueError in Python) with a
// message in ropekit's format ("ropekit: expected ..., got .... Fix: ..."); the Python
// layer turns it into a RopeError. Numerics: see kernel.cpp.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <Python.h>
#include <c10/util/irange.h>
#include <torch/autograd.h>
#include <torch/csrc/autograd/VariableTypeUtils.h>
#include <torch/library.h>

#include <algorithm>
#include <cctype>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#if defined(__linux__)
#include <sys/mman.h>
#endif

#include "kernel.h"

namespace {

using at::Tensor;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// Below this many bytes moved (reads + writes, all jobs) one thread runs the call: handing
// work to the pool costs more than it saves.
constexpr int64_t kParallelBytes = 1 << 20;
// Each pool task gets at least this many bytes.
constexpr int64_t kGrainBytes = 256 << 10;
// Out-of-place calls writing at least this many bytes use streaming stores.
constexpr int64_t kNtBytes = 16 << 20;
// Fresh outputs of at least this many bytes are advised onto transparent huge pages.
constexpr int64_t kHugeBytes = 4 << 20;

#define RK_CHECK(cond, ...) TORCH_CHECK_VALUE(cond, "ropekit: expected ", __VA_ARGS__)

// ---------------------------------------------------------------------------------------
// instruction-set levels

struct Level {
    const char* name;
    int (*features)(void);
    void (*finish)(RkJob*, int64_t, int64_t, int64_t);
    void (*rows)(const RkJob*, int64_t, int64_t, int64_t);
};

const Level kLevels[] = {
    {"default", rk_features_default, rk_finish_default, rk_rows_default},
#if defined(__x86_64__) || defined(_M_X64)
    {"avx2", rk_features_avx2, rk_finish_avx2, rk_rows_avx2},
    {"avx512", rk_features_avx512, rk_finish_avx512, rk_rows_avx512},
#endif
};
constexpr int kNumLevels = sizeof(kLevels) / sizeof(kLevels[0]);

int cpu_max_level() {
#if (defined(__x86_64__) || defined(_M_X64)) && (defined(__GNUC__) || defined(__clang__))
    __builtin_cpu_init();  // CPUID and the OS's saved-state flags (XGETBV)
    const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
    if (avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
        __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq"))
        return 2;
    if (avx2) return 1;
#endif
    return 0;
}

// The best level this CPU runs, or a lower one named by ROPEKIT_CPU_CAPABILITY
// (default, avx2, avx512; a level above the CPU's is ignored), chosen once per process.
const Level& level() {
    static const Level* chosen = [] {
        int lv = cpu_max_level();
        const char* env = std::getenv("ROPEKIT_CPU_CAPABILITY");
        if (env != nullptr && *env != '\0') {
            std::string want(env);
            std::transform(want.begin(), want.end(), want.begin(), [](unsigned char c) { return std::tolower(c); });
            int idx = -1;
            for (int i = 0; i < kNumLevels; ++i)
                if (want == kLevels[i].name) idx = i;
            if (idx < 0) {
                TORCH_WARN("ropekit: ROPEKIT_CPU_CAPABILITY=", env, " is not a level (default, avx2, avx512); using ",
                           kLevels[lv].name);
            } else if (idx < lv) {
                lv = idx;
            }
        }
        return &kLevels[lv];
    }();
    return *chosen;
}

// ---------------------------------------------------------------------------------------
// checks

int64_t dtype_code(at::ScalarType t) {
    switch (t) {
        case at::kFloat: return 0;
        case at::kBFloat16: return 1;
        case at::kHalf: return 2;
        case at::kDouble: return 3;
        default: return -1;
    }
}

int64_t parse_layout(c10::string_view layout) {
    if (layout == "half") return 0;
    if (layout == "interleaved") return 1;
    RK_CHECK(false, "layout in ('half', 'interleaved'), got '", std::string(layout),
             "'. Fix: use \"half\" (pairs i, i+r/2: GPT-NeoX / HF Llama) or \"interleaved\" (pairs 2i, 2i+1: "
             "RoFormer / GPT-J / Meta llama)");
    return 0;
}

std::string shape_str(const Tensor& t) { return c10::str(t.sizes()); }

void check_x(const Tensor& x, const char* name) {
    RK_CHECK(x.defined(), name, " a tensor, got None. Fix: pass a tensor");
    RK_CHECK(dtype_code(x.scalar_type()) >= 0, name, " of a real floating dtype (float16, bfloat16, float32, float64), got ",
             name, ".dtype=", x.scalar_type(), ". Fix: convert ", name, " to float (e.g. ", name, ".float())");
    RK_CHECK(x.dim() >= 1, name, " [..., d], got a 0-d tensor. Fix: pass q/k with a head-dim axis");
}

void check_same_device(const Tensor& ref, const Tensor& t, const char* ref_name, const char* name) {
    RK_CHECK(t.device() == ref.device(), name, " on ", ref_name, "'s device ", ref.device(), ", got ", name, " on ",
             t.device(), ". Fix: move it: ", name, ".to(", ref_name, ".device)");
}

// cos/sin: half width [..., r/2], broadcastable to x.shape[:-1] + (r/2,) without enlarging x.
// Returns r/2.
int64_t check_tables(const Tensor& x, const Tensor& cos, const Tensor& sin, const char* name) {
    for (const Tensor* t : {&cos, &sin}) {
        const char* nm = t == &cos ? "cos" : "sin";
        RK_CHECK(t->defined(), nm, " a tensor, got None. Fix: build tables with ropekit.cos_sin");
        RK_CHECK(dtype_code(t->scalar_type()) >= 0, nm, " of a real floating dtype, got ", nm, ".dtype=", t->scalar_type(),
                 ". Fix: build tables with ropekit.cos_sin");
        check_same_device(x, *t, name, nm);
    }
    RK_CHECK(cos.sizes() == sin.sizes(), "cos and sin of the same shape, got ", shape_str(cos), " and ", shape_str(sin),
             ". Fix: build both with ropekit.cos_sin");
    RK_CHECK(cos.dim() >= 1 && cos.size(-1) >= 1, name, " [..., d] and cos/sin [..., r/2] with r/2 >= 1, got ", name, " ",
             shape_str(x), ", cos ", shape_str(cos), ". Fix: pass half-width tables from ropekit.cos_sin");
    const int64_t half = cos.size(-1), d = x.size(-1);
    RK_CHECK(2 * half <= d, "cos/sin of width r/2 <= d/2 = ", d / 2, " (half width: one value per frequency), got width ",
             half, " for ", name, " of head dim ", d, ". Fix: ",
             half == d ? "these look like full-width tables (transformers' form): convert with "
                         "ropekit.from_full_width(cos, layout)"
                       : "use tables built for this head dim (rotary_dim <= head_dim)");
    bool ok = cos.dim() <= x.dim();
    for (int64_t i = 2; ok && i <= cos.dim(); ++i) {
        const int64_t c = cos.size(-i);
        ok = c == 1 || c == x.size(-i);
    }
    if (!ok) {
        std::vector<int64_t> target(x.sizes().begin(), x.sizes().end());
        target.back() = half;
        RK_CHECK(false, "cos/sin broadcastable to ", name, ".shape[:-1] + (r/2,) = ", c10::IntArrayRef(target),
                 ", got cos/sin of shape ", shape_str(cos),
                 ". Fix: index the tables with positions of the same batch/sequence layout as ", name,
                 " and unsqueeze the heads dim (e.g. cos[:, :, None, :] for bshd)");
    }
    return half;
}

// A sufficient test that no two indices of t share memory, from sizes and strides only:
// the dims of size > 1 sorted by stride must each step past the extent of the previous ones.
bool non_overlapping(c10::IntArrayRef sizes, c10::IntArrayRef strides) {
    std::vector<std::pair<int64_t, int64_t>> dims;  // (stride, size)
    for (const auto i : c10::irange(sizes.size()))
        if (sizes[i] != 1) dims.emplace_back(strides[i], sizes[i]);
    std::sort(dims.begin(), dims.end());
    int64_t extent = 1;  // elements spanned by the dims seen so far
    for (const auto& [st, sz] : dims) {
        if (sz == 0) return true;
        if (st < extent) return false;
        extent = st * (sz - 1) + extent;
    }
    return true;
}

void check_writable(const Tensor& t, const char* name) {
    RK_CHECK(t.numel() <= 1 || non_overlapping(t.sizes(), t.strides()), name,
             " whose elements do not alias (it is written in place), got ", name, " with overlapping memory (shape ",
             shape_str(t), ", stride ", t.strides(), ", e.g. from expand or unfold). Fix: pass ", name,
             ".contiguous() or use inplace=False");
}

// Whether a and b provably share no element. Different storages, or disjoint byte ranges,
// or (the views of one fused qkv buffer) tensors of equal strides and sizes except along one
// dim j, offset by a multiple of that dim's stride so that both are disjoint index ranges
// [0, n_a) and [c, c + n_b) of one non-overlapping strided tensor.
bool disjoint(const Tensor& a, const Tensor& b) {
    if (a.numel() == 0 || b.numel() == 0 || !a.is_alias_of(b)) return true;
    const int64_t es = a.element_size();
    auto span = [](const Tensor& t) {
        int64_t n = 1;
        for (const auto i : c10::irange(t.dim())) n += (t.size(i) - 1) * t.stride(i);
        return n * t.element_size();
    };
    const auto pa = reinterpret_cast<intptr_t>(a.data_ptr()), pb = reinterpret_cast<intptr_t>(b.data_ptr());
    if (pa + span(a) <= pb || pb + span(b) <= pa) return true;
    if (a.dim() != b.dim() || a.strides() != b.strides() || b.element_size() != es || (pb - pa) % es != 0) return false;
    const int64_t delta = (pb - pa) / es;
    for (const auto j : c10::irange(a.dim())) {
        bool others_equal = true;
        for (const auto i : c10::irange(a.dim()))
            if (i != j && a.size(i) != b.size(i)) others_equal = false;
        const int64_t st = a.stride(j);
        if (!others_equal || st <= 0 || delta % st != 0) continue;
        int64_t c = delta / st, n_lo = a.size(j), n_hi = b.size(j);
        if (c < 0) {
            c = -c;
            std::swap(n_lo, n_hi);
        }
        if (c < n_lo) continue;
        std::vector<int64_t> sizes(a.sizes().begin(), a.sizes().end());
        sizes[j] = c + n_hi;
        if (non_overlapping(sizes, a.strides())) return true;
    }
    return false;
}

void check_qk_disjoint(const Tensor& q, const Tensor& k) {
    RK_CHECK(disjoint(q, k),
             "q and k that share no memory when rotated in place, got q ", shape_str(q), " stride ", q.strides(), " and k ",
             shape_str(k), " stride ", k.strides(),
             " overlapping in one storage (each shared element would be rotated twice). Fix: rotate q and k in separate "
             "calls, or use inplace=False");
}

// ---------------------------------------------------------------------------------------
// jobs

// Output for rot(x): empty_like(x) (x's strides when they are dense: a bshd view of bhsd
// memory stays so) when x's last dim is unit-stride, else contiguous. The fake (Meta)
// kernels in ropekit/ops.py use the same rule.
Tensor new_out(const Tensor& x) {
    const bool keep = x.size(-1) <= 1 || x.stride(-1) == 1;
    return at::empty_like(x, keep ? at::MemoryFormat::Preserve : at::MemoryFormat::Contiguous);
}

bool g_huge_pages = [] {
    const char* env = std::getenv("ROPEKIT_HUGEPAGES");
    return env == nullptr || std::strcmp(env, "0") != 0;
}();

// A fresh CPU output about to be written by the kernel: large ones are advised onto
// transparent huge pages (MADV_HUGEPAGE, only a hint): with THP mode "madvise" every 4 KiB
// page of a fresh multi-MB tensor otherwise faults on its first write. ROPEKIT_HUGEPAGES=0
// turns it off.
Tensor new_cpu_out(const Tensor& x) {
    Tensor out = new_out(x);
#if defined(__linux__) && defined(MADV_HUGEPAGE)
    const int64_t n = out.numel() * out.element_size();
    if (g_huge_pages && n >= kHugeBytes) {
        const intptr_t huge = intptr_t(2) << 20, addr = reinterpret_cast<intptr_t>(out.data_ptr());
        const intptr_t lo = (addr + huge - 1) & ~(huge - 1), hi = (addr + n) & ~(huge - 1);
        if (hi > lo) madvise(reinterpret_cast<void*>(lo), static_cast<size_t>(hi - lo), MADV_HUGEPAGE);
    }
#endif
    return out;
}

Tensor compute_tables(const Tensor& t, int64_t dt) {
    const auto cdt = dt == 3 ? at::kDouble : at::kFloat;
    Tensor r = t.scalar_type() == cdt ? t : t.to(cdt);
    return (r.size(-1) <= 1 || r.stride(-1) == 1) ? r : r.contiguous();
}

int64_t element_bytes(int64_t dt) { return dt == 0 ? 4 : dt == 3 ? 8 : 2; }

// Fill j's leading dims from x's (innermost last): broadcast tables, drop size-1 dims, merge
// dims that are contiguous for every operand. false: more than RK_MAXD dims remain.
// cst/sst: the table strides aligned with x's leading dims (0 = broadcast); pst: positions.
bool fill_dims(RkJob& j, const Tensor& x, const Tensor& out, const int64_t* cst, const int64_t* sst, const int64_t* pst) {
    const int64_t L = x.dim() - 1;
    int64_t nd = 0, nrows = 1;
    for (int64_t i = 0; i < L; ++i) {
        const int64_t sz = x.size(i);
        nrows *= sz;
        if (sz == 1) continue;
        const int64_t xs = x.stride(i), os = out.stride(i), c = cst[i], s = sst[i], p = pst[i];
        if (nd > 0) {  // merge into the previous dim when every operand is contiguous across both
            const int64_t q = nd - 1;
            if (j.xs[q] == xs * sz && j.os[q] == os * sz && j.cs[q] == c * sz && j.ss[q] == s * sz && j.ps[q] == p * sz) {
                j.size[q] *= sz;
                j.xs[q] = xs, j.os[q] = os, j.cs[q] = c, j.ss[q] = s, j.ps[q] = p;
                continue;
            }
        }
        if (nd == RK_MAXD) return false;
        j.size[nd] = sz;
        j.xs[nd] = xs, j.os[nd] = os, j.cs[nd] = c, j.ss[nd] = s, j.ps[nd] = p;
        ++nd;
    }
    if (nd == 0) {  // a single row
        j.size[0] = 1;
        j.xs[0] = j.os[0] = j.cs[0] = j.ss[0] = j.ps[0] = 0;
        nd = 1;
    }
    j.nd = nd;
    j.nrows = nrows;
    return true;
}

void job_head(RkJob& j, const Tensor& x, const Tensor& out, int64_t half, int64_t layout, bool conj) {
    std::memset(&j, 0, sizeof j);
    j.dtype = dtype_code(x.scalar_type());
    j.layout = layout;
    j.conj = conj ? 1 : 0;
    j.half = half;
    j.d = x.size(-1);
    j.x = reinterpret_cast<intptr_t>(x.data_ptr());
    j.o = reinterpret_cast<intptr_t>(out.data_ptr());
}

bool unit_last(const Tensor& t) { return t.size(-1) <= 1 || t.stride(-1) == 1; }

// out = rot(x) with cos/sin (compute dtype, unit last stride) broadcast through strides.
bool strided_job(RkJob& j, const Tensor& x, const Tensor& out, const Tensor& cos, const Tensor& sin, int64_t layout,
                 bool conj) {
    if (!unit_last(x) || !unit_last(out)) return false;
    const int64_t L = x.dim() - 1, off = L - (cos.dim() - 1);  // table dim i - off aligns with x's dim i
    constexpr int64_t kMaxLead = 64;
    int64_t cst[kMaxLead], sst[kMaxLead], pst[kMaxLead];
    if (L > kMaxLead) return false;
    for (int64_t i = 0; i < L; ++i) {
        const int64_t ci = i - off;
        const bool b = ci < 0 || cos.size(ci) == 1;
        cst[i] = b ? 0 : cos.stride(ci);
        sst[i] = b ? 0 : sin.stride(ci);
        pst[i] = 0;
    }
    job_head(j, x, out, cos.size(-1), layout, conj);
    j.c = reinterpret_cast<intptr_t>(cos.data_ptr());
    j.s = reinterpret_cast<intptr_t>(sin.data_ptr());
    return fill_dims(j, x, out, cst, sst, pst);
}

void run_jobs(RkJob* jobs, int64_t njobs) {
    int64_t total = 0, bytes = 0;
    for (int64_t n = 0; n < njobs; ++n) {
        total += jobs[n].nrows;
        bytes += 2 * jobs[n].nrows * jobs[n].d * element_bytes(jobs[n].dtype);
    }
    if (total == 0) return;
    const Level& lv = level();
    lv.finish(jobs, njobs, bytes, kNtBytes);
    if (bytes < kParallelBytes || total == 1) {
        lv.rows(jobs, njobs, 0, total);
        return;
    }
    const int64_t grain = std::max<int64_t>(1, total * kGrainBytes / bytes);
    at::parallel_for(0, total, grain, [&](int64_t b, int64_t e) { lv.rows(jobs, njobs, b, e); });
}

bool supported_dtype(const Tensor& x) {
    const int64_t dt = dtype_code(x.scalar_type());
    return dt >= 0 && (dt != 2 || (level().features() & 1));
}

// out = rot(x) (out may be x: in place). Falls back to contiguous copies for layouts the
// kernel does not take (non-unit last strides, more than RK_MAXD unmergeable dims).
void rotate_into(const Tensor& x, const Tensor& cos, const Tensor& sin, int64_t layout, bool conj, const Tensor& out) {
    if (x.numel() == 0) return;
    if (!supported_dtype(x)) {  // a build without a float16 kernel: the same bits through float32
        const Tensor xf = x.to(at::kFloat), of = at::empty_like(xf);
        rotate_into(xf, cos, sin, layout, conj, of);
        out.copy_(of);
        return;
    }
    const int64_t dt = dtype_code(x.scalar_type());
    const Tensor c = compute_tables(cos, dt), s = compute_tables(sin, dt);
    RkJob j;
    if (strided_job(j, x, out, c, s, layout, conj)) {
        run_jobs(&j, 1);
        return;
    }
    // layouts the kernel does not take (a non-unit last stride, more than RK_MAXD dims that
    // cannot be merged): rows of contiguous copies, tables expanded to one row per row
    const int64_t d = x.size(-1), half = c.size(-1);
    std::vector<int64_t> tshape(x.sizes().begin(), x.sizes().end());
    tshape.back() = half;
    const Tensor xc = x.contiguous().view({-1, d});
    const Tensor cc = c.expand(tshape).contiguous().view({-1, half}), sc = s.expand(tshape).contiguous().view({-1, half});
    const Tensor oc = at::empty_like(xc);
    TORCH_INTERNAL_ASSERT(strided_job(j, xc, oc, cc, sc, layout, conj));
    run_jobs(&j, 1);
    out.copy_(oc.view(x.sizes()));
}

// ---------------------------------------------------------------------------------------
// CPU kernels

Tensor rotary_cpu(const Tensor& x, const Tensor& cos, const Tensor& sin, c10::string_view layout, bool conjugate) {
    check_x(x, "x");
    check_tables(x, cos, sin, "x");
    const int64_t lay = parse_layout(layout);
    Tensor out = new_cpu_out(x);
    rotate_into(x, cos, sin, lay, conjugate, out);
    return out;
}

void rotary__cpu(Tensor& x, const Tensor& cos, const Tensor& sin, c10::string_view layout, bool conjugate) {
    check_x(x, "x");
    check_tables(x, cos, sin, "x");
    const int64_t lay = parse_layout(layout);
    check_writable(x, "x");
    rotate_into(x, cos, sin, lay, conjugate, x);
}

void check_out(const Tensor& x, const Tensor& out) {
    RK_CHECK(out.defined() && out.sizes() == x.sizes() && out.scalar_type() == x.scalar_type() &&
                 out.device() == x.device(),
             "out of x's shape/dtype/device ", shape_str(x), " ", x.scalar_type(), " on ", x.device(), ", got ",
             out.defined() ? c10::str(shape_str(out), " ", out.scalar_type(), " on ", out.device()) : std::string("None"),
             ". Fix: allocate it with torch.empty_like(x)");
    check_writable(out, "out");
    const bool same = out.data_ptr() == x.data_ptr() && out.strides() == x.strides();
    RK_CHECK(same || disjoint(x, out), "out not overlapping x (or exactly x), got out sharing memory with x",
             ". Fix: use inplace=True or a fresh buffer");
}

void rotary_out_cpu(const Tensor& x, const Tensor& cos, const Tensor& sin, c10::string_view layout, bool conjugate,
                    Tensor& out) {
    check_x(x, "x");
    check_tables(x, cos, sin, "x");
    const int64_t lay = parse_layout(layout);
    check_out(x, out);
    rotate_into(x, cos, sin, lay, conjugate, out);
}

void check_qk(const Tensor& q, const Tensor& k, const Tensor& cos, const Tensor& sin) {
    check_x(q, "q");
    check_x(k, "k");
    check_same_device(q, k, "q", "k");
    check_tables(q, cos, sin, "q");
    check_tables(k, cos, sin, "k");
}

// q and k through one kernel call (one pass over the rows of both); falls back to two
// calls when either needs contiguous copies or their dtypes differ.
void rotate_qk_into(const Tensor& q, const Tensor& k, const Tensor& cos, const Tensor& sin, int64_t layout, bool conj,
                    const Tensor& qo, const Tensor& ko) {
    if (q.scalar_type() == k.scalar_type() && q.numel() && k.numel() && supported_dtype(q)) {
        const int64_t dt = dtype_code(q.scalar_type());
        const Tensor c = compute_tables(cos, dt), s = compute_tables(sin, dt);
        RkJob j[2];
        if (strided_job(j[0], q, qo, c, s, layout, conj) && strided_job(j[1], k, ko, c, s, layout, conj)) {
            run_jobs(j, 2);
            return;
        }
    }
    rotate_into(q, cos, sin, layout, conj, qo);
    rotate_into(k, cos, sin, layout, conj, ko);
}

std::tuple<Tensor, Tensor> rotary_qk_cpu(const Tensor& q, const Tensor& k, const Tensor& cos, const Tensor& sin,
                                         c10::string_view layout, bool conjugate) {
    check_qk(q, k, cos, sin);
    const int64_t lay = parse_layout(layout);
    Tensor qo = new_cpu_out(q), ko = new_cpu_out(k);
    rotate_qk_into(q, k, cos, sin, lay, conjugate, qo, ko);
    return {qo, ko};
}

void rotary_qk__cpu(Tensor& q, Tensor& k, const Tensor& cos, const Tensor& sin, c10::string_view layout, bool conjugate) {
    check_qk(q, k, cos, sin);
    const int64_t lay = parse_layout(layout);
    check_writable(q, "q");
    check_writable(k, "k");
    check_qk_disjoint(q, k);
    rotate_qk_into(q, k, cos, sin, lay, conjugate, q, k);
}

// --- gather: table rows picked by position ------------------------------------------------

struct Format {
    int64_t ndim;  // of q/k
    int64_t b, s;  // dims of batch and sequence in q/k (b = -1: none, thd)
    int64_t h;     // heads dim
};

Format parse_format(c10::string_view f) {
    if (f == "bshd") return {4, 0, 1, 2};
    if (f == "bhsd") return {4, 0, 2, 1};
    if (f == "sbhd") return {4, 1, 0, 2};
    if (f == "thd") return {3, -1, 0, 1};
    RK_CHECK(false, "format in ('bshd', 'bhsd', 'sbhd', 'thd'), got '", std::string(f),
             "'. Fix: name the layout of q and k ([b, s, h, d] is 'bshd')");
    return {};
}

// Checks q, k, tables and positions; returns the positions as contiguous int64.
Tensor check_gather(const Tensor& q, const Tensor& k, const Tensor& ct, const Tensor& st, const Tensor& pos,
                    const Format& f, c10::string_view fmt) {
    check_x(q, "q");
    check_x(k, "k");
    check_same_device(q, k, "q", "k");
    const std::string fs(fmt);
    for (const Tensor* t : {&q, &k}) {
        const char* nm = t == &q ? "q" : "k";
        RK_CHECK(t->dim() == f.ndim, nm, " of ", f.ndim, " dims for format '", fs, "', got ", nm, " of shape ",
                 shape_str(*t), ". Fix: ", f.ndim == 3 ? "pack tokens as [t, h, d] for 'thd'" : "pass [b, s, h, d]-like tensors or use format='thd' for packed [t, h, d]");
    }
    const int64_t b = f.b < 0 ? 1 : q.size(f.b), s = q.size(f.s);
    RK_CHECK((f.b < 0 || k.size(f.b) == b) && k.size(f.s) == s, "q and k with the same batch and sequence sizes in format '",
             fs, "', got q ", shape_str(q), " and k ", shape_str(k), ". Fix: rotate them in separate calls");
    RK_CHECK(q.size(-1) == k.size(-1), "q and k of the same head dim, got ", q.size(-1), " and ", k.size(-1),
             ". Fix: use one RopeConfig per head dim");
    for (const Tensor* t : {&ct, &st}) {
        const char* nm = t == &ct ? "cos_table" : "sin_table";
        RK_CHECK(t->defined() && t->dim() == 2 && dtype_code(t->scalar_type()) >= 0, nm, " a float [n, r/2] table, got ",
                 t->defined() ? c10::str("shape ", shape_str(*t), " ", t->scalar_type()) : std::string("None"),
                 ". Fix: pass the tables of RotaryEmbedding.tables(n)");
        check_same_device(q, *t, "q", nm);
    }
    RK_CHECK(ct.sizes() == st.sizes() && ct.size(1) >= 1 && 2 * ct.size(1) <= q.size(-1),
             "cos_table and sin_table of one shape [n, r/2] with 1 <= r/2 <= d/2 = ", q.size(-1) / 2, ", got ",
             shape_str(ct), " and ", shape_str(st), ". Fix: build them with ropekit.cos_sin(cfg, torch.arange(n))");
    RK_CHECK(pos.defined() && at::isIntegralType(pos.scalar_type(), /*includeBool=*/false), "positions an integer tensor, got ",
             pos.defined() ? c10::str(pos.scalar_type()) : std::string("None"), ". Fix: pass int64 positions");
    check_same_device(q, pos, "q", "positions");
    // [b] with s == 1: one token per sample (decode), read as [b, 1]
    const bool per_sample = f.b >= 0 && s == 1 && pos.dim() == 1 && pos.size(0) == b && b != 1;
    const bool ok = f.b < 0 ? (pos.dim() == 1 && pos.size(0) == s)
                            : ((pos.dim() == 1 && pos.size(0) == s) || per_sample ||
                               (pos.dim() == 2 && (pos.size(0) == b || pos.size(0) == 1) && pos.size(1) == s));
    RK_CHECK(ok, "positions of shape ", f.b < 0 ? c10::str("[", s, "]") : c10::str("[", s, "] or [", b, ", ", s, "]"),
             " for q ", shape_str(q), " in format '", fs, "', got shape ", shape_str(pos),
             ". Fix: one position per token ([s] shared by the batch, [b, s] per sample, [t] packed)");
    const Tensor p = pos.scalar_type() == at::kLong ? pos.contiguous() : pos.to(at::kLong).contiguous();
    return per_sample ? p.view({b, 1}) : p;
}

void check_positions_range(const Tensor& pos, int64_t n) {
    if (!pos.is_cpu() || pos.numel() == 0) return;
    const int64_t* p = pos.const_data_ptr<int64_t>();
    int64_t lo = p[0], hi = p[0];
    for (int64_t i = 1; i < pos.numel(); ++i) lo = std::min(lo, p[i]), hi = std::max(hi, p[i]);
    RK_CHECK(lo >= 0 && hi < n, "positions in [0, ", n, ") (the table length), got positions from ", lo, " to ", hi,
             ". Fix: grow the tables (RotaryEmbedding.tables(max_position + 1)) or fix the positions");
}

bool gather_job(RkJob& j, const Tensor& x, const Tensor& out, const Tensor& ct, const Tensor& st, const Tensor& pos,
                const Format& f, int64_t layout, bool conj) {
    if (!unit_last(x) || !unit_last(out)) return false;
    int64_t zero[4] = {0, 0, 0, 0}, pst[4] = {0, 0, 0, 0};
    if (pos.dim() == 1) {
        pst[f.s] = 1;
    } else {
        pst[f.s] = pos.stride(1);
        pst[f.b] = pos.size(0) == 1 ? 0 : pos.stride(0);
    }
    job_head(j, x, out, ct.size(1), layout, conj);
    j.gather = 1;
    j.c = reinterpret_cast<intptr_t>(ct.data_ptr());
    j.s = reinterpret_cast<intptr_t>(st.data_ptr());
    j.pos = reinterpret_cast<intptr_t>(pos.data_ptr());
    j.npos = pos.numel();
    j.ntable = ct.size(0);
    return fill_dims(j, x, out, zero, zero, pst);
}

void gather_into(const Tensor& q, const Tensor& k, const Tensor& ct, const Tensor& st, const Tensor& pos, const Format& f,
                 int64_t layout, bool conj, const Tensor& qo, const Tensor& ko) {
    check_positions_range(pos, ct.size(0));
    if (q.numel() == 0 && k.numel() == 0) return;
    const Tensor* xs[2] = {&q, &k};
    const Tensor* os[2] = {&qo, &ko};
    if (q.scalar_type() == k.scalar_type() && supported_dtype(q)) {
        const int64_t dt = dtype_code(q.scalar_type());
        const Tensor c = compute_tables(ct, dt).contiguous(), s = compute_tables(st, dt).contiguous();
        RkJob j[2];
        int64_t n = 0;
        bool ok = true;
        for (int i = 0; i < 2 && ok; ++i)
            if (xs[i]->numel()) ok = gather_job(j[n++], *xs[i], *os[i], c, s, pos, f, layout, conj);
        if (ok) {
            run_jobs(j, n);
            return;
        }
    }
    // other layouts: gather the rows first, then the strided path
    for (int i = 0; i < 2; ++i) {
        if (xs[i]->numel() == 0) continue;
        Tensor cg = ct.index_select(0, pos.reshape(-1)), sg = st.index_select(0, pos.reshape(-1));  // [npos, r/2]
        std::vector<int64_t> shape(xs[i]->dim(), 1);
        shape.back() = ct.size(1);
        if (pos.dim() == 1) {
            shape[f.s] = pos.size(0);
        } else {
            shape[f.b] = pos.size(0);
            shape[f.s] = pos.size(1);
        }
        // [b|1, s] positions -> a table of x's rank with size-1 heads (sbhd: s before b)
        if (pos.dim() == 2 && f.s < f.b) {
            cg = cg.view({pos.size(0), pos.size(1), -1}).transpose(0, 1);
            sg = sg.view({pos.size(0), pos.size(1), -1}).transpose(0, 1);
        }
        cg = cg.reshape(shape), sg = sg.reshape(shape);
        rotate_into(*xs[i], cg, sg, layout, conj, *os[i]);
    }
}

std::tuple<Tensor, Tensor> rotary_gather_cpu(const Tensor& q, const Tensor& k, const Tensor& ct, const Tensor& st,
                                             const Tensor& positions, c10::string_view format, c10::string_view layout,
                                             bool conjugate) {
    const Format f = parse_format(format);
    const Tensor pos = check_gather(q, k, ct, st, positions, f, format);
    const int64_t lay = parse_layout(layout);
    Tensor qo = new_cpu_out(q), ko = new_cpu_out(k);
    gather_into(q, k, ct, st, pos, f, lay, conjugate, qo, ko);
    return {qo, ko};
}

void rotary_gather__cpu(Tensor& q, Tensor& k, const Tensor& ct, const Tensor& st, const Tensor& positions,
                        c10::string_view format, c10::string_view layout, bool conjugate) {
    const Format f = parse_format(format);
    const Tensor pos = check_gather(q, k, ct, st, positions, f, format);
    const int64_t lay = parse_layout(layout);
    check_writable(q, "q");
    check_writable(k, "k");
    check_qk_disjoint(q, k);
    gather_into(q, k, ct, st, pos, f, lay, conjugate, q, k);
}

std::string cpu_capability() { return level().name; }

// ---------------------------------------------------------------------------------------
// the ops as typed handles (for the autograd and ADInplaceOrView kernels)

#define RK_OP(name, sig) \
    c10::Dispatcher::singleton().findSchemaOrThrow("ropekit::" name, "").typed<sig>()

using RotarySig = Tensor(const Tensor&, const Tensor&, const Tensor&, c10::string_view, bool);
using RotaryInSig = void(Tensor&, const Tensor&, const Tensor&, c10::string_view, bool);
using RotaryOutSig = void(const Tensor&, const Tensor&, const Tensor&, c10::string_view, bool, Tensor&);
using QKSig = std::tuple<Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&, const Tensor&, c10::string_view, bool);
using QKInSig = void(Tensor&, Tensor&, const Tensor&, const Tensor&, c10::string_view, bool);
using GatherSig = std::tuple<Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                                             c10::string_view, c10::string_view, bool);
using GatherInSig = void(Tensor&, Tensor&, const Tensor&, const Tensor&, const Tensor&, c10::string_view, c10::string_view,
                         bool);

Tensor call_rotary(const Tensor& x, const Tensor& c, const Tensor& s, c10::string_view l, bool conj) {
    static auto op = RK_OP("rotary", RotarySig);
    return op.call(x, c, s, l, conj);
}
std::tuple<Tensor, Tensor> call_qk(const Tensor& q, const Tensor& k, const Tensor& c, const Tensor& s, c10::string_view l,
                                   bool conj) {
    static auto op = RK_OP("rotary_qk", QKSig);
    return op.call(q, k, c, s, l, conj);
}
std::tuple<Tensor, Tensor> call_gather(const Tensor& q, const Tensor& k, const Tensor& ct, const Tensor& st,
                                       const Tensor& p, c10::string_view f, c10::string_view l, bool conj) {
    static auto op = RK_OP("rotary_gather", GatherSig);
    return op.call(q, k, ct, st, p, f, l, conj);
}

// ---------------------------------------------------------------------------------------
// ADInplaceOrView: bump the version counters of what an in-place op wrote (autograd then
// refuses a backward that saved the old values)

void rotary__adinplace(c10::DispatchKeySet ks, Tensor& x, const Tensor& c, const Tensor& s, c10::string_view l, bool j) {
    static auto op = RK_OP("rotary_", RotaryInSig);
    op.redispatch(ks & c10::after_ADInplaceOrView_keyset, x, c, s, l, j);
    torch::autograd::increment_version(x);
}

void rotary_out_adinplace(c10::DispatchKeySet ks, const Tensor& x, const Tensor& c, const Tensor& s, c10::string_view l,
                          bool j, Tensor& out) {
    static auto op = RK_OP("rotary_out", RotaryOutSig);
    op.redispatch(ks & c10::after_ADInplaceOrView_keyset, x, c, s, l, j, out);
    torch::autograd::increment_version(out);
}

void rotary_qk__adinplace(c10::DispatchKeySet ks, Tensor& q, Tensor& k, const Tensor& c, const Tensor& s,
                          c10::string_view l, bool j) {
    static auto op = RK_OP("rotary_qk_", QKInSig);
    op.redispatch(ks & c10::after_ADInplaceOrView_keyset, q, k, c, s, l, j);
    torch::autograd::increment_version(q);
    torch::autograd::increment_version(k);
}

void rotary_gather__adinplace(c10::DispatchKeySet ks, Tensor& q, Tensor& k, const Tensor& ct, const Tensor& st,
                              const Tensor& p, c10::string_view f, c10::string_view l, bool j) {
    static auto op = RK_OP("rotary_gather_", GatherInSig);
    op.redispatch(ks & c10::after_ADInplaceOrView_keyset, q, k, ct, st, p, f, l, j);
    torch::autograd::increment_version(q);
    torch::autograd::increment_version(k);
}

// ---------------------------------------------------------------------------------------
// Autograd: d/dx R(θ)x = R(θ)ᵀ = R(-θ), the same op conjugated. Only the tables (and the
// positions) are saved. The tables themselves get no gradient: a call whose tables require
// grad is refused (the Python API sends learnable tables to the eager formula).

bool grad_on(std::initializer_list<const Tensor*> ts) {
    if (!at::GradMode::is_enabled()) return false;
    for (const Tensor* t : ts)
        if (t->defined() && t->requires_grad()) return true;
    return false;
}

void check_tables_no_grad(const Tensor& c, const Tensor& s) {
    RK_CHECK(!(c.requires_grad() || s.requires_grad()),
             "cos/sin that do not require grad (the fused op differentiates q/k only), got tables that require grad",
             ". Fix: detach them, or use backend=\"eager\" for learnable tables");
}

void check_not_leaf(const Tensor& t, const char* name) {
    RK_CHECK(!(t.is_leaf() && t.requires_grad()), "inplace=True on a tensor autograd may modify, got ", name,
             ": a leaf tensor that requires grad. Fix: use inplace=False, or apply to a non-leaf (e.g. the output of the "
             "projection)");
}

std::string layout_of(AutogradContext* ctx) { return ctx->saved_data["layout"].toStringRef(); }

void save_rotation(AutogradContext* ctx, c10::string_view layout, bool conj) {
    ctx->saved_data["layout"] = std::string(layout);
    ctx->saved_data["conj"] = conj;
}

class RotaryFn : public torch::autograd::Function<RotaryFn> {
   public:
    static Tensor forward(AutogradContext* ctx, const Tensor& x, const Tensor& c, const Tensor& s, std::string layout,
                          bool conj) {
        at::AutoDispatchBelowADInplaceOrView guard;
        Tensor y = call_rotary(x, c, s, layout, conj);
        ctx->save_for_backward({c, s});
        save_rotation(ctx, layout, conj);
        return y;
    }
    static variable_list backward(AutogradContext* ctx, variable_list g) {
        const auto saved = ctx->get_saved_variables();
        Tensor dx = g[0].defined() ? call_rotary(g[0], saved[0], saved[1], layout_of(ctx), !ctx->saved_data["conj"].toBool())
                                   : Tensor();
        return {dx, Tensor(), Tensor(), Tensor(), Tensor()};
    }
};

// The backward of an in-place rotation already applied to x: marks x modified (autograd's
// view + in-place handling, one single-output node per tensor) and records R(-θ).
class RotatedFn : public torch::autograd::Function<RotatedFn> {
   public:
    static Tensor forward(AutogradContext* ctx, const Tensor& x, const Tensor& c, const Tensor& s, std::string layout,
                          bool conj) {
        ctx->mark_dirty({x});
        ctx->save_for_backward({c, s});
        save_rotation(ctx, layout, conj);
        return x;
    }
    static variable_list backward(AutogradContext* ctx, variable_list g) {
        return RotaryFn::backward(ctx, std::move(g));
    }
};

// Single tensor of a gather backward: k with no heads.
Tensor no_heads(const Tensor& x, c10::string_view format) {
    std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
    shape[parse_format(format).h] = 0;
    return at::empty(shape, x.options());
}

variable_list gather_backward(const Tensor& gq, const Tensor& gk, const Tensor& ct, const Tensor& st, const Tensor& pos,
                              const std::string& fmt, const std::string& layout, bool conj) {
    Tensor dq, dk;
    if (gq.defined() && gk.defined()) {
        std::tie(dq, dk) = call_gather(gq, gk, ct, st, pos, fmt, layout, !conj);
    } else if (gq.defined()) {
        dq = std::get<0>(call_gather(gq, no_heads(gq, fmt), ct, st, pos, fmt, layout, !conj));
    } else if (gk.defined()) {
        dk = std::get<1>(call_gather(no_heads(gk, fmt), gk, ct, st, pos, fmt, layout, !conj));
    }
    return {dq, dk};
}

class RotaryQKFn : public torch::autograd::Function<RotaryQKFn> {
   public:
    static variable_list forward(AutogradContext* ctx, const Tensor& q, const Tensor& k, const Tensor& c, const Tensor& s,
                                 std::string layout, bool conj) {
        at::AutoDispatchBelowADInplaceOrView guard;
        auto [qo, ko] = call_qk(q, k, c, s, layout, conj);
        ctx->set_materialize_grads(false);  // an unused output's gradient stays undefined: no work for it
        ctx->save_for_backward({c, s});
        save_rotation(ctx, layout, conj);
        return {qo, ko};
    }
    static variable_list backward(AutogradContext* ctx, variable_list g) {
        const auto saved = ctx->get_saved_variables();
        const std::string layout = layout_of(ctx);
        const bool conj = !ctx->saved_data["conj"].toBool();
        Tensor dq, dk;
        if (g[0].defined() && g[1].defined()) {
            std::tie(dq, dk) = call_qk(g[0], g[1], saved[0], saved[1], layout, conj);
        } else {
            if (g[0].defined()) dq = call_rotary(g[0], saved[0], saved[1], layout, conj);
            if (g[1].defined()) dk = call_rotary(g[1], saved[0], saved[1], layout, conj);
        }
        return {dq, dk, Tensor(), Tensor(), Tensor(), Tensor()};
    }
};

class GatherFn : public torch::autograd::Function<GatherFn> {
   public:
    static variable_list forward(AutogradContext* ctx, const Tensor& q, const Tensor& k, const Tensor& ct, const Tensor& st,
                                 const Tensor& pos, std::string fmt, std::string layout, bool conj) {
        at::AutoDispatchBelowADInplaceOrView guard;
        auto [qo, ko] = call_gather(q, k, ct, st, pos, fmt, layout, conj);
        ctx->set_materialize_grads(false);
        ctx->save_for_backward({ct, st, pos});
        save_rotation(ctx, layout, conj);
        ctx->saved_data["format"] = fmt;
        return {qo, ko};
    }
    static variable_list backward(AutogradContext* ctx, variable_list g) {
        const auto saved = ctx->get_saved_variables();
        auto d = gather_backward(g[0], g[1], saved[0], saved[1], saved[2], ctx->saved_data["format"].toStringRef(),
                                 layout_of(ctx), ctx->saved_data["conj"].toBool());
        return {d[0], d[1], Tensor(), Tensor(), Tensor(), Tensor(), Tensor(), Tensor()};
    }
};

// The gather counterpart of RotatedFn: one tensor (q or k) of an in-place gather.
class GatheredFn : public torch::autograd::Function<GatheredFn> {
   public:
    static Tensor forward(AutogradContext* ctx, const Tensor& x, const Tensor& ct, const Tensor& st, const Tensor& pos,
                          std::string fmt, std::string layout, bool conj, bool is_k) {
        ctx->mark_dirty({x});
        ctx->save_for_backward({ct, st, pos});
        save_rotation(ctx, layout, conj);
        ctx->saved_data["format"] = fmt;
        ctx->saved_data["is_k"] = is_k;
        return x;
    }
    static variable_list backward(AutogradContext* ctx, variable_list g) {
        const auto saved = ctx->get_saved_variables();
        const bool is_k = ctx->saved_data["is_k"].toBool();
        auto d = gather_backward(is_k ? Tensor() : g[0], is_k ? g[0] : Tensor(), saved[0], saved[1], saved[2],
                                 ctx->saved_data["format"].toStringRef(), layout_of(ctx), ctx->saved_data["conj"].toBool());
        return {d[is_k ? 1 : 0], Tensor(), Tensor(), Tensor(), Tensor(), Tensor(), Tensor(), Tensor()};
    }
};

Tensor rotary_autograd(const Tensor& x, const Tensor& c, const Tensor& s, c10::string_view layout, bool conj) {
    if (!grad_on({&x, &c, &s})) {
        at::AutoDispatchBelowADInplaceOrView guard;
        return call_rotary(x, c, s, layout, conj);
    }
    check_tables_no_grad(c, s);
    return RotaryFn::apply(x, c, s, std::string(layout), conj);
}

std::tuple<Tensor, Tensor> rotary_qk_autograd(const Tensor& q, const Tensor& k, const Tensor& c, const Tensor& s,
                                              c10::string_view layout, bool conj) {
    if (!grad_on({&q, &k, &c, &s})) {
        at::AutoDispatchBelowADInplaceOrView guard;
        return call_qk(q, k, c, s, layout, conj);
    }
    check_tables_no_grad(c, s);
    auto r = RotaryQKFn::apply(q, k, c, s, std::string(layout), conj);
    return {r[0], r[1]};
}

std::tuple<Tensor, Tensor> rotary_gather_autograd(const Tensor& q, const Tensor& k, const Tensor& ct, const Tensor& st,
                                                  const Tensor& pos, c10::string_view fmt, c10::string_view layout,
                                                  bool conj) {
    if (!grad_on({&q, &k, &ct, &st})) {
        at::AutoDispatchBelowADInplaceOrView guard;
        return call_gather(q, k, ct, st, pos, fmt, layout, conj);
    }
    check_tables_no_grad(ct, st);
    auto r = GatherFn::apply(q, k, ct, st, pos, std::string(fmt), std::string(layout), conj);
    return {r[0], r[1]};
}

void rotary__autograd(c10::DispatchKeySet ks, Tensor& x, const Tensor& c, const Tensor& s, c10::string_view layout,
                      bool conj) {
    static auto op = RK_OP("rotary_", RotaryInSig);
    const bool grad = grad_on({&x, &c, &s});
    if (grad) {
        check_tables_no_grad(c, s);
        check_not_leaf(x, "x");
    }
    op.redispatch(ks & c10::after_autograd_keyset, x, c, s, layout, conj);
    if (grad) RotatedFn::apply(x, c, s, std::string(layout), conj);
}

void rotary_out_autograd(c10::DispatchKeySet ks, const Tensor& x, const Tensor& c, const Tensor& s,
                         c10::string_view layout, bool conj, Tensor& out) {
    static auto op = RK_OP("rotary_out", RotaryOutSig);
    RK_CHECK(!grad_on({&x, &c, &s, &out}), "out= without autograd, got inputs that require grad",
             ". Fix: drop out= (or run under torch.no_grad())");
    op.redispatch(ks & c10::after_autograd_keyset, x, c, s, layout, conj, out);
}

void rotary_qk__autograd(c10::DispatchKeySet ks, Tensor& q, Tensor& k, const Tensor& c, const Tensor& s,
                         c10::string_view layout, bool conj) {
    static auto op = RK_OP("rotary_qk_", QKInSig);
    const bool grad = grad_on({&q, &k, &c, &s});
    if (grad) {
        check_tables_no_grad(c, s);
        check_not_leaf(q, "q");
        check_not_leaf(k, "k");
    }
    op.redispatch(ks & c10::after_autograd_keyset, q, k, c, s, layout, conj);
    if (grad) {
        // one node per tensor: autograd's view + in-place handling takes single-output nodes
        if (q.requires_grad()) RotatedFn::apply(q, c, s, std::string(layout), conj);
        if (k.requires_grad()) RotatedFn::apply(k, c, s, std::string(layout), conj);
    }
}

void rotary_gather__autograd(c10::DispatchKeySet ks, Tensor& q, Tensor& k, const Tensor& ct, const Tensor& st,
                             const Tensor& pos, c10::string_view fmt, c10::string_view layout, bool conj) {
    static auto op = RK_OP("rotary_gather_", GatherInSig);
    const bool grad = grad_on({&q, &k, &ct, &st});
    if (grad) {
        check_tables_no_grad(ct, st);
        check_not_leaf(q, "q");
        check_not_leaf(k, "k");
    }
    op.redispatch(ks & c10::after_autograd_keyset, q, k, ct, st, pos, fmt, layout, conj);
    if (grad) {
        if (q.requires_grad()) GatheredFn::apply(q, ct, st, pos, std::string(fmt), std::string(layout), conj, false);
        if (k.requires_grad()) GatheredFn::apply(k, ct, st, pos, std::string(fmt), std::string(layout), conj, true);
    }
}

}  // namespace

TORCH_LIBRARY(ropekit, m) {
    m.def("rotary(Tensor x, Tensor cos, Tensor sin, str layout=\"half\", bool conjugate=False) -> Tensor");
    m.def("rotary_(Tensor(a!) x, Tensor cos, Tensor sin, str layout=\"half\", bool conjugate=False) -> ()");
    m.def("rotary_out(Tensor x, Tensor cos, Tensor sin, str layout=\"half\", bool conjugate=False, *, Tensor(a!) out) -> ()");
    m.def("rotary_qk(Tensor q, Tensor k, Tensor cos, Tensor sin, str layout=\"half\", bool conjugate=False) -> (Tensor, Tensor)");
    m.def("rotary_qk_(Tensor(a!) q, Tensor(b!) k, Tensor cos, Tensor sin, str layout=\"half\", bool conjugate=False) -> ()");
    m.def("rotary_gather(Tensor q, Tensor k, Tensor cos_table, Tensor sin_table, Tensor positions, str format=\"bshd\", "
          "str layout=\"half\", bool conjugate=False) -> (Tensor, Tensor)");
    m.def("rotary_gather_(Tensor(a!) q, Tensor(b!) k, Tensor cos_table, Tensor sin_table, Tensor positions, "
          "str format=\"bshd\", str layout=\"half\", bool conjugate=False) -> ()");
    m.def("cpu_capability() -> str", &cpu_capability);
}

TORCH_LIBRARY_IMPL(ropekit, CPU, m) {
    m.impl("rotary", &rotary_cpu);
    m.impl("rotary_", &rotary__cpu);
    m.impl("rotary_out", &rotary_out_cpu);
    m.impl("rotary_qk", &rotary_qk_cpu);
    m.impl("rotary_qk_", &rotary_qk__cpu);
    m.impl("rotary_gather", &rotary_gather_cpu);
    m.impl("rotary_gather_", &rotary_gather__cpu);
}

TORCH_LIBRARY_IMPL(ropekit, ADInplaceOrView, m) {
    m.impl("rotary_", torch::dispatch(c10::DispatchKey::ADInplaceOrView, TORCH_FN(rotary__adinplace)));
    m.impl("rotary_out", torch::dispatch(c10::DispatchKey::ADInplaceOrView, TORCH_FN(rotary_out_adinplace)));
    m.impl("rotary_qk_", torch::dispatch(c10::DispatchKey::ADInplaceOrView, TORCH_FN(rotary_qk__adinplace)));
    m.impl("rotary_gather_", torch::dispatch(c10::DispatchKey::ADInplaceOrView, TORCH_FN(rotary_gather__adinplace)));
}

TORCH_LIBRARY_IMPL(ropekit, Autograd, m) {
    m.impl("rotary", &rotary_autograd);
    m.impl("rotary_", torch::dispatch(c10::DispatchKey::Autograd, TORCH_FN(rotary__autograd)));
    m.impl("rotary_out", torch::dispatch(c10::DispatchKey::Autograd, TORCH_FN(rotary_out_autograd)));
    m.impl("rotary_qk", &rotary_qk_autograd);
    m.impl("rotary_qk_", torch::dispatch(c10::DispatchKey::Autograd, TORCH_FN(rotary_qk__autograd)));
    m.impl("rotary_gather", &rotary_gather_autograd);
    m.impl("rotary_gather_", torch::dispatch(c10::DispatchKey::Autograd, TORCH_FN(rotary_gather__autograd)));
}

// `import ropekit._C` loads this library, whose static initialisers above register the ops.
PyMODINIT_FUNC PyInit__C(void) {
    static PyModuleDef def = {PyModuleDef_HEAD_INIT, "ropekit._C", "ropekit's dispatcher operators (torch.ops.ropekit)",
                              -1, nullptr};
    return PyModule_Create(&def);
}
