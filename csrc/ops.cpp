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
//   cos_sin(angles) -> (cos, sin)                           float64 cos/sin per element, IEEE operations only
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
#include <torch/extension.h>
#include <c10/util/irange.h>
#include <torch/autograd.h>
#include <torch/csrc/autograd/VariableTypeUtils.h>
#include <torch/library.h>
#include <c10/util/SmallVector.h>
#include <torch/csrc/jit/frontend/tracer.h>
#include <ATen/PythonTorchFunctionTLS.h>
#include <c10/core/impl/TorchDispatchModeTLS.h>

#include <algorithm>
#include <cmath>
#include <cctype>
#include <cerrno>
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
// Out-of-place calls writing at least this many bytes use streaming stores (default;
// ROPEKIT_STREAM_BYTES overrides it: stream_bytes below).
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
    void (*norm_fwd)(const RkNormJob*, int64_t, int64_t, int64_t);
    void (*norm_bwd)(const RkNormJob*, int64_t, int64_t, int64_t);
    void (*sincos)(const double*, double*, double*, int64_t);
};

const Level kLevels[] = {
    {"default", rk_features_default, rk_finish_default, rk_rows_default, rk_norm_fwd_default, rk_norm_bwd_default,
     rk_sincos_default},
#if defined(__x86_64__) || defined(_M_X64)
    {"avx2", rk_features_avx2, rk_finish_avx2, rk_rows_avx2, rk_norm_fwd_avx2, rk_norm_bwd_avx2, rk_sincos_avx2},
    {"avx512", rk_features_avx512, rk_finish_avx512, rk_rows_avx512, rk_norm_fwd_avx512, rk_norm_bwd_avx512,
     rk_sincos_avx512},
    {"avx512bf16", rk_features_avx512bf16, rk_finish_avx512bf16, rk_rows_avx512bf16, rk_norm_fwd_avx512bf16,
     rk_norm_bwd_avx512bf16, rk_sincos_avx512bf16},
#endif
};
constexpr int kNumLevels = sizeof(kLevels) / sizeof(kLevels[0]);

int cpu_max_level() {
#if (defined(__x86_64__) || defined(_M_X64)) && (defined(__GNUC__) || defined(__clang__))
    __builtin_cpu_init();  // CPUID and the OS's saved-state flags (XGETBV)
    const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
    if (avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
        __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq"))
        return __builtin_cpu_supports("avx512bf16") ? 3 : 2;
    if (avx2) return 1;
#endif
    return 0;
}

// The best level this CPU runs, or a lower one named by ROPEKIT_CPU_CAPABILITY
// (default, avx2, avx512, avx512bf16; a level above the CPU's is ignored), chosen once per process.
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
                TORCH_WARN("ropekit: ROPEKIT_CPU_CAPABILITY=", env, " is not a level (default, avx2, avx512, avx512bf16); using ",
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

// A dtype as Python names it (torch.float32), for messages.
std::string dt_str(at::ScalarType t) {
    switch (t) {
        case at::kFloat: return "torch.float32";
        case at::kDouble: return "torch.float64";
        case at::kHalf: return "torch.float16";
        case at::kBFloat16: return "torch.bfloat16";
        case at::kLong: return "torch.int64";
        case at::kInt: return "torch.int32";
        case at::kShort: return "torch.int16";
        case at::kChar: return "torch.int8";
        case at::kByte: return "torch.uint8";
        case at::kBool: return "torch.bool";
        case at::kComplexFloat: return "torch.complex64";
        case at::kComplexDouble: return "torch.complex128";
        default: return c10::str("torch.", c10::toString(t));
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

// Sizes as Python prints a tuple ((2, 4, 3, 8); (5,)): what the caller's t.shape shows
// (symbolic sizes under torch.compile(dynamic=True) included).
std::string tuple_str(c10::SymIntArrayRef v) {
    std::string out = "(";
    for (size_t i = 0; i < v.size(); ++i) out += c10::str(i ? ", " : "", v[i]);
    return out + (v.size() == 1 ? ",)" : ")");
}
std::string shape_str(const Tensor& t) { return tuple_str(t.sym_sizes()); }
std::string stride_str(const Tensor& t) { return tuple_str(t.sym_strides()); }

// Shapes that only exist as symbols (fake tensors of a dynamic-shape trace): memory layout
// checks need concrete strides, so they are left to the kernel that runs the real tensors.
bool symbolic(const Tensor& t) { return t.unsafeGetTensorImpl()->has_symbolic_sizes_strides(); }

void check_x(const Tensor& x, const char* name) {
    RK_CHECK(x.defined(), name, " a tensor, got None. Fix: pass a tensor");
    RK_CHECK(dtype_code(x.scalar_type()) >= 0, name, " of a real floating dtype (float16, bfloat16, float32, float64), got ",
             name, ".dtype=", dt_str(x.scalar_type()), ". Fix: ",
             at::isComplexType(x.scalar_type())
                 ? c10::str("rotate the real q/k tensors (view complex tensors with torch.view_as_real first)")
                 : c10::str("convert ", name, " to float (e.g. ", name, ".float())"));
    RK_CHECK(x.dim() >= 1, name, " [..., d], got a 0-d tensor. Fix: pass q/k with a head-dim axis");
}

void check_same_device(const Tensor& ref, const Tensor& t, const char* ref_name, const char* name) {
    RK_CHECK(t.device() == ref.device(), name, " on ", ref_name, "'s device ", ref.device(), ", got ", name, " on ",
             t.device(), ". Fix: move it: ", name, ".to(", ref_name, ".device)");
}

// cos/sin: half width [..., r/2], broadcastable to x.shape[:-1] + (r/2,) without enlarging x.
void check_tables(const Tensor& x, const Tensor& cos, const Tensor& sin, const char* name) {
    for (const Tensor* t : {&cos, &sin}) {
        const char* nm = t == &cos ? "cos" : "sin";
        RK_CHECK(t->defined(), nm, " a tensor, got None. Fix: build tables with ropekit.cos_sin");
        RK_CHECK(dtype_code(t->scalar_type()) >= 0, nm, " of a real floating dtype, got ", nm, ".dtype=", dt_str(t->scalar_type()),
                 ". Fix: build tables with ropekit.cos_sin");
        check_same_device(x, *t, name, nm);
    }
    RK_CHECK(cos.sym_sizes() == sin.sym_sizes(), "cos and sin of the same shape, got ", shape_str(cos), " and ",
             shape_str(sin), ". Fix: build both with ropekit.cos_sin");
    RK_CHECK(cos.dim() >= 1 && cos.sym_size(-1) >= 1, name, " [..., d] and cos/sin [..., r/2] with r/2 >= 1, got ", name,
             " ", shape_str(x), ", cos ", shape_str(cos), ". Fix: pass half-width tables from ropekit.cos_sin");
    const c10::SymInt half = cos.sym_size(-1), d = x.sym_size(-1);
    RK_CHECK(half * 2 <= d, "cos/sin of width r/2 <= d/2 = ", d / 2, " (half width: one value per frequency), got width ",
             half, " for ", name, " of head dim ", d, ". Fix: ",
             half == d ? "these look like full-width tables (transformers' form): convert with "
                         "ropekit.from_full_width(cos, layout)"
                       : "use tables built for this head dim (rotary_dim <= head_dim)");
    bool ok = cos.dim() <= x.dim();
    for (int64_t i = 2; ok && i <= cos.dim(); ++i) {
        const c10::SymInt c = cos.sym_size(-i);
        ok = c == 1 || c == x.sym_size(-i);
    }
    if (!ok) {
        std::vector<c10::SymInt> target(x.sym_sizes().begin(), x.sym_sizes().end());
        target.back() = half;
        RK_CHECK(false, "cos/sin broadcastable to ", name, ".shape[:-1] + (r/2,) = ", tuple_str(target),
                 ", got cos/sin of shape ", shape_str(cos),
                 ". Fix: index the tables with positions of the same batch/sequence layout as ", name,
                 " and unsqueeze the heads dim (e.g. cos[:, :, None, :] for bshd)");
    }
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
    // torch refuses it too, but only after the kernel has written (when the version counter is bumped)
    RK_CHECK(!t.is_inference() || c10::InferenceMode::is_enabled(), name,
             " a normal tensor when written outside torch.inference_mode(), got ", name,
             " an inference tensor (created under torch.inference_mode()). Fix: write into ", name,
             ".clone(), or make the call under torch.inference_mode()");
    if (symbolic(t)) return;
    RK_CHECK(t.numel() <= 1 || non_overlapping(t.sizes(), t.strides()), name,
             " whose elements do not alias (it is written in place), got ", name, " with overlapping memory (shape ",
             shape_str(t), ", stride ", stride_str(t), ", e.g. from expand or unfold). Fix: pass ", name,
             ".contiguous() or use inplace=False");
}

// Whether a and b provably share no element. Different storages, or disjoint byte ranges,
// or (the views of one fused qkv buffer) tensors of equal strides and sizes except along one
// dim j, offset by a multiple of that dim's stride so that both are disjoint index ranges
// [0, n_a) and [c, c + n_b) of one non-overlapping strided tensor. Offsets come from the
// storage (not data pointers), so meta and fake tensors are told apart the same way.
bool disjoint(const Tensor& a, const Tensor& b) {
    if (symbolic(a) || symbolic(b) || !a.has_storage() || !b.has_storage()) return true;  // the real kernel checks
    if (a.numel() == 0 || b.numel() == 0 || !a.is_alias_of(b)) return true;
    auto span = [](const Tensor& t) {
        int64_t n = 1;
        for (const auto i : c10::irange(t.dim())) n += (t.size(i) - 1) * std::abs(t.stride(i));
        return n * t.element_size();
    };
    auto low = [](const Tensor& t) {  // the lowest element's byte offset (negative strides cannot occur in torch)
        return t.storage_offset() * t.element_size();
    };
    const int64_t es = a.element_size(), pa = low(a), pb = low(b);
    if (pa + span(a) <= pb || pb + span(b) <= pa) return true;
    // Bands of a common period p (bytes): when every element of a lies, modulo p, in
    // [ra, ra + wa) and every element of b in [rb, rb + wb), both inside [0, p), and the two
    // bands are disjoint, no element is shared — e.g. a table stored beside x in each row of
    // one buffer, or the q and k heads of a fused qkv projection. Candidates p: the strides.
    auto band = [](const Tensor& t, int64_t p, int64_t& r, int64_t& w) {
        const int64_t e = t.element_size();
        w = e;
        for (const auto i : c10::irange(t.dim())) {
            const int64_t sb = t.stride(i) * e;
            if (t.size(i) > 1 && sb % p != 0) w += (t.size(i) - 1) * sb;
        }
        r = (t.storage_offset() * e) % p;
        return r + w <= p;
    };
    for (const Tensor* t : {&a, &b})
        for (const auto i : c10::irange(t->dim())) {
            const int64_t p = t->stride(i) * t->element_size();
            int64_t ra, wa, rb, wb;
            if (t->size(i) > 1 && p > 0 && band(a, p, ra, wa) && band(b, p, rb, wb) && (ra + wa <= rb || rb + wb <= ra))
                return true;
        }
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

// Exactly the same elements in the same order (an out= that is x: in place).
bool same_view(const Tensor& a, const Tensor& b) {
    if (symbolic(a) || symbolic(b) || !a.has_storage() || !b.has_storage()) return false;
    return a.is_alias_of(b) && a.storage_offset() * a.element_size() == b.storage_offset() * b.element_size() &&
           a.sizes() == b.sizes() && a.strides() == b.strides() && a.scalar_type() == b.scalar_type();
}

void check_qk_disjoint(const Tensor& q, const Tensor& k) {
    RK_CHECK(disjoint(q, k),
             "q and k that share no memory when rotated in place, got q ", shape_str(q), " stride ", stride_str(q), " and k ",
             shape_str(k), " stride ", stride_str(k),
             " overlapping in one storage (each shared element would be rotated twice). Fix: rotate q and k in separate "
             "calls, or use inplace=False");
}

// A written tensor w against an input the same call reads: any shared element would be read
// after (or while) it is overwritten.
void check_no_overlap(const Tensor& w, const char* wn, const Tensor& in, const char* inn) {
    if (!in.defined()) return;
    RK_CHECK(disjoint(w, in), wn, " sharing no memory with ", inn, " (", wn, " is written while ", inn,
             " is read), got ", wn, " ", shape_str(w), " stride ", stride_str(w), " and ", inn, " ", shape_str(in),
             " stride ", stride_str(in), " overlapping in one storage. Fix: pass a copy (", inn,
             ".clone()), or write into a fresh tensor (inplace=False)");
}

void check_out(const Tensor& x, const Tensor& out) {
    RK_CHECK(out.defined() && out.sym_sizes() == x.sym_sizes() && out.scalar_type() == x.scalar_type() &&
                 out.device() == x.device(),
             "out of x's shape/dtype/device ", shape_str(x), " ", dt_str(x.scalar_type()), " on ", x.device(), ", got ",
             out.defined() ? c10::str(shape_str(out), " ", dt_str(out.scalar_type()), " on ", out.device()) : std::string("None"),
             ". Fix: allocate it with torch.empty_like(x)");
    check_writable(out, "out");
    RK_CHECK(same_view(x, out) || disjoint(x, out), "out not overlapping x (or exactly x), got out ", shape_str(out),
             " stride ", stride_str(out), " sharing memory with x ", shape_str(x), " stride ", stride_str(x),
             ". Fix: use inplace=True or a fresh buffer");
}

// --- one validator per op: the CPU kernels, the fake kernels (ropekit/ops.py, through the
// module's check_* functions) and every other device's kernels call these and nothing else.

// rotary / rotary_ (inplace) / rotary_out (out); returns the layout code.
int64_t validate_rotary(const Tensor& x, const Tensor& cos, const Tensor& sin, c10::string_view layout, bool inplace,
                        const Tensor* out) {
    check_x(x, "x");
    check_tables(x, cos, sin, "x");
    const int64_t lay = parse_layout(layout);
    if (inplace) {
        check_writable(x, "x");
        check_no_overlap(x, "x", cos, "cos");
        check_no_overlap(x, "x", sin, "sin");
    }
    if (out != nullptr) {
        check_out(x, *out);
        check_no_overlap(*out, "out", cos, "cos");
        check_no_overlap(*out, "out", sin, "sin");
    }
    return lay;
}

void check_written_pair(const Tensor& q, const Tensor& k, std::initializer_list<std::pair<const Tensor*, const char*>> ins) {
    check_writable(q, "q");
    check_writable(k, "k");
    check_qk_disjoint(q, k);
    for (const auto& [t, nm] : ins) {
        check_no_overlap(q, "q", *t, nm);
        check_no_overlap(k, "k", *t, nm);
    }
}

// rotary_qk / rotary_qk_; returns the layout code.
int64_t validate_qk(const Tensor& q, const Tensor& k, const Tensor& cos, const Tensor& sin, c10::string_view layout,
                    bool inplace) {
    check_x(q, "q");
    check_x(k, "k");
    check_same_device(q, k, "q", "k");
    check_tables(q, cos, sin, "q");
    check_tables(k, cos, sin, "k");
    const int64_t lay = parse_layout(layout);
    if (inplace) check_written_pair(q, k, {{&cos, "cos"}, {&sin, "sin"}});
    return lay;
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

// Tables indexed by position (gather, cache): cos_table/sin_table float [n, r/2] on q's
// device, one shape, 1 <= r/2 <= d/2.
void check_row_tables(const Tensor& q, const Tensor& ct, const Tensor& st) {
    for (const Tensor* t : {&ct, &st}) {
        const char* nm = t == &ct ? "cos_table" : "sin_table";
        RK_CHECK(t->defined() && t->dim() == 2 && dtype_code(t->scalar_type()) >= 0, nm, " a float [n, r/2] table, got ",
                 t->defined() ? c10::str("shape ", shape_str(*t), " ", dt_str(t->scalar_type())) : std::string("None"),
                 ". Fix: pass ropekit.cos_sin(cfg, torch.arange(n)) (or RotaryEmbedding.tables(n))");
        check_same_device(q, *t, "q", nm);
    }
    RK_CHECK(ct.sym_sizes() == st.sym_sizes() && ct.sym_size(1) >= 1 && ct.sym_size(1) * 2 <= q.sym_size(-1),
             "cos_table and sin_table of one shape [n, r/2] with 1 <= r/2 <= d/2 = ", q.sym_size(-1) / 2, ", got ",
             shape_str(ct), " and ", shape_str(st), ". Fix: ",
             ct.sym_size(1) == q.sym_size(-1) ? "these look like full-width tables (transformers' form): convert with "
                                                "ropekit.from_full_width(cos, layout)"
                                              : "build them with ropekit.cos_sin(cfg, torch.arange(n))");
}

struct GatherCall {
    Format f;
    int64_t layout;
    bool per_sample;  // positions [b] for s == 1: one token per sample (decode), read as [b, 1]
};

// rotary_gather / rotary_gather_ (the values of positions are checked by the kernels: they
// need the data).
GatherCall validate_gather(const Tensor& q, const Tensor& k, const Tensor& ct, const Tensor& st, const Tensor& pos,
                           c10::string_view fmt, c10::string_view layout, bool inplace) {
    const Format f = parse_format(fmt);
    check_x(q, "q");
    check_x(k, "k");
    check_same_device(q, k, "q", "k");
    const std::string fs(fmt);
    for (const Tensor* t : {&q, &k}) {
        const char* nm = t == &q ? "q" : "k";
        RK_CHECK(t->dim() == f.ndim, nm, " of ", f.ndim, " dims for format '", fs, "', got ", nm, " of shape ",
                 shape_str(*t), ". Fix: ",
                 f.ndim == 3 ? "pack tokens as [t, h, d] for 'thd'"
                             : "pass [b, s, h, d]-like tensors or use format='thd' for packed [t, h, d]");
    }
    const c10::SymInt b = f.b < 0 ? c10::SymInt(1) : q.sym_size(f.b), s = q.sym_size(f.s);
    RK_CHECK((f.b < 0 || k.sym_size(f.b) == b) && k.sym_size(f.s) == s,
             "q and k with the same batch and sequence sizes in format '", fs, "', got q ", shape_str(q), " and k ",
             shape_str(k), ". Fix: rotate them in separate calls");
    RK_CHECK(q.sym_size(-1) == k.sym_size(-1), "q and k of the same head dim, got ", q.sym_size(-1), " and ",
             k.sym_size(-1), ". Fix: use one RopeConfig per head dim");
    check_row_tables(q, ct, st);
    RK_CHECK(pos.defined() && at::isIntegralType(pos.scalar_type(), /*includeBool=*/false),
             "positions an integer tensor, got ", pos.defined() ? dt_str(pos.scalar_type()) : std::string("None"),
             ". Fix: pass int64 positions");
    check_same_device(q, pos, "q", "positions");
    const bool per_sample = f.b >= 0 && s == 1 && pos.dim() == 1 && pos.sym_size(0) == b && b != 1;
    const bool ok = f.b < 0 ? (pos.dim() == 1 && pos.sym_size(0) == s)
                            : ((pos.dim() == 1 && pos.sym_size(0) == s) || per_sample ||
                               (pos.dim() == 2 && (pos.sym_size(0) == b || pos.sym_size(0) == 1) && pos.sym_size(1) == s));
    RK_CHECK(ok, "positions of shape ",
             f.b < 0 ? c10::str("[", s, "]") : c10::str("[", s, "] or [", b, ", ", s, "]"), " for q ", shape_str(q),
             " in format '", fs, "', got shape ", shape_str(pos),
             ". Fix: one position per token ([s] shared by the batch, [b, s] per sample, [t] packed)");
    const int64_t lay = parse_layout(layout);
    if (inplace) check_written_pair(q, k, {{&ct, "cos_table"}, {&st, "sin_table"}, {&pos, "positions"}});
    return {f, lay, per_sample};
}

// --- fused per-head RMSNorm + rotation -----------------------------------------------------

void check_norm_weight(const Tensor& x, const Tensor& w, const char* xn, const char* wn) {
    RK_CHECK(w.defined(), wn, " a tensor of shape [", x.sym_size(-1), "], got None. Fix: pass the norm's weight");
    RK_CHECK(dtype_code(w.scalar_type()) >= 0, wn, " of a real floating dtype, got ", wn, ".dtype=", dt_str(w.scalar_type()),
             ". Fix: convert it: ", wn, ".float()");
    check_same_device(x, w, xn, wn);
    RK_CHECK(w.dim() == 1 && w.sym_size(0) == x.sym_size(-1), wn, " of shape [", x.sym_size(-1), "] (", xn,
             "'s head dim: one weight per dim, shared by every head), got shape ", c10::str(w.sym_sizes()),
             ". Fix: pass the per-head norm's weight [head_dim] (a norm over all heads, [h * d], is not a per-head norm)");
}

void check_offset(double offset) {
    RK_CHECK(std::isfinite(offset), "weight_offset a finite number, got ", offset,
             ". Fix: pass 0.0 (y = x̂·w) or 1.0 (Gemma: y = x̂·(1 + w))");
}

// qk_norm_rotary, qk_norm_rotary_, qk_norm_rotary_fwd, qk_norm_rotary_fwd_; returns the layout code.
int64_t validate_qk_norm(const Tensor& q, const Tensor& k, const Tensor& qw, const Tensor& kw, const Tensor& cos,
                         const Tensor& sin, double eps, double offset, c10::string_view layout, bool inplace) {
    const int64_t lay = validate_qk(q, k, cos, sin, layout, false);
    check_norm_weight(q, qw, "q", "q_weight");
    check_norm_weight(k, kw, "k", "k_weight");
    RK_CHECK(std::isfinite(eps) && eps >= 0, "eps a finite number >= 0, got ", eps,
             ". Fix: pass the norm's epsilon, e.g. eps=1e-6");
    check_offset(offset);
    if (inplace)
        check_written_pair(q, k, {{&cos, "cos"}, {&sin, "sin"}, {&qw, "q_weight"}, {&kw, "k_weight"}});
    return lay;
}

at::ScalarType compute_type(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

// qk_norm_rotary_bwd. An empty q (or k) is the absent side of a single-tensor backward: its
// tables are not checked against it.
int64_t validate_qk_norm_bwd(const Tensor& gq, const Tensor& gk, const Tensor& q, const Tensor& k, const Tensor& qw,
                             const Tensor& kw, const Tensor& rq, const Tensor& rk, const Tensor& cos, const Tensor& sin,
                             double offset, c10::string_view layout) {
    check_x(q, "q");
    check_x(k, "k");
    check_same_device(q, k, "q", "k");
    for (const Tensor* t : {&cos, &sin}) {
        const char* nm = t == &cos ? "cos" : "sin";
        RK_CHECK(t->defined() && dtype_code(t->scalar_type()) >= 0, nm, " a float table, got ",
                 t->defined() ? dt_str(t->scalar_type()) : std::string("None"), ". Fix: pass the forward's tables");
        check_same_device(q, *t, "q", nm);
    }
    if (q.sym_numel() != 0) check_tables(q, cos, sin, "q");
    if (k.sym_numel() != 0) check_tables(k, cos, sin, "k");
    const Tensor* xs[2] = {&q, &k};
    const Tensor* gs[2] = {&gq, &gk};
    const Tensor* rs[2] = {&rq, &rk};
    const char* gn[2] = {"grad_q", "grad_k"};
    const char* rn[2] = {"q_rstd", "k_rstd"};
    for (int i = 0; i < 2; ++i) {
        const Tensor &x = *xs[i], &g = *gs[i], &r = *rs[i];
        check_x(g, gn[i]);
        check_same_device(q, g, "q", gn[i]);
        RK_CHECK(g.sym_sizes() == x.sym_sizes(), gn[i], " of ", i ? "k" : "q", "'s shape ", shape_str(x), ", got ",
                 shape_str(g), ". Fix: pass the gradient of the forward's output");
        RK_CHECK(r.defined() && r.scalar_type() == compute_type(x.scalar_type()), rn[i], " of dtype ",
                 dt_str(compute_type(x.scalar_type())), " (the forward's saved inverse RMS), got ",
                 r.defined() ? dt_str(r.scalar_type()) : std::string("None"),
                 ". Fix: pass the q_rstd/k_rstd that qk_norm_rotary_fwd returned");
        check_same_device(q, r, "q", rn[i]);
        RK_CHECK(r.sym_sizes() == x.sym_sizes().slice(0, x.dim() - 1), rn[i], " of shape ",
                 tuple_str(x.sym_sizes().slice(0, x.dim() - 1)), " (one inverse RMS per head row), got ",
                 shape_str(r), ". Fix: pass the q_rstd/k_rstd that qk_norm_rotary_fwd returned");
    }
    check_norm_weight(q, qw, "q", "q_weight");
    check_norm_weight(k, kw, "k", "k_weight");
    check_offset(offset);
    return parse_layout(layout);
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
    if (g_huge_pages && n >= kHugeBytes && out.is_cpu()) {
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

// Merge x's leading dims (innermost last) for the 5 operands whose element strides along
// them are in[k][0 .. x.dim() - 1): size-1 dims are dropped and dims contiguous for every
// operand merged; writes size[0 .. nd) and out[k][0 .. nd). false: more than RK_MAXD remain.
bool merge_dims(const Tensor& x, const int64_t* const in[5], int64_t* size, int64_t* const out[5], int64_t& nd_out,
                int64_t& nrows_out) {
    const int64_t L = x.dim() - 1;
    int64_t nd = 0, nrows = 1;
    for (int64_t i = 0; i < L; ++i) {
        const int64_t sz = x.size(i);
        nrows *= sz;
        if (sz == 1) continue;
        if (nd > 0) {  // merge into the previous dim when every operand is contiguous across both
            bool merge = true;
            for (int k = 0; k < 5; ++k) merge = merge && out[k][nd - 1] == in[k][i] * sz;
            if (merge) {
                size[nd - 1] *= sz;
                for (int k = 0; k < 5; ++k) out[k][nd - 1] = in[k][i];
                continue;
            }
        }
        if (nd == RK_MAXD) return false;
        size[nd] = sz;
        for (int k = 0; k < 5; ++k) out[k][nd] = in[k][i];
        ++nd;
    }
    if (nd == 0) {  // a single row
        size[0] = 1;
        for (int k = 0; k < 5; ++k) out[k][0] = 0;
        nd = 1;
    }
    nd_out = nd;
    nrows_out = nrows;
    return true;
}

// Fill j's leading dims from x's; cst/sst: the table strides aligned with x's leading dims
// (0 = broadcast); pst: positions.
// The kernel takes the rows along its innermost dim that share a table row (or a gather's
// position) as one run. When x's innermost dim in memory is such a dim but not the last of the
// row dims (a [b, h, s, d] view of [b, s, h, d] memory, as attention code transposes q and k,
// with tables over s), it is moved last: the rows are the same, enumerated in memory order
// (each row is computed on its own, so the bits do not depend on the order).
bool fill_dims(RkJob& j, const Tensor& x, const Tensor& out, const int64_t* cst, const int64_t* sst, const int64_t* pst) {
    const int64_t* in[5] = {x.strides().data(), out.strides().data(), cst, sst, pst};
    int64_t* dst[5] = {j.xs, j.os, j.cs, j.ss, j.ps};
    if (!merge_dims(x, in, j.size, dst, j.nd, j.nrows)) return false;
    const int64_t n = j.nd;
    auto shared = [&](int64_t k) { return j.cs[k] == 0 && j.ss[k] == 0 && (!j.gather || j.ps[k] == 0); };
    if (n >= 2 && !shared(n - 1)) {
        int64_t best = -1;
        for (int64_t k = 0; k < n - 1; ++k)
            if (shared(k) && std::abs(j.xs[k]) < std::abs(j.xs[n - 1]) && std::abs(j.os[k]) <= std::abs(j.os[n - 1]) &&
                (best < 0 || std::abs(j.xs[k]) < std::abs(j.xs[best])))
                best = k;
        if (best >= 0) {
            int64_t* arr[6] = {j.size, j.xs, j.os, j.cs, j.ss, j.ps};
            for (int64_t* a : arr) {
                const int64_t v = a[best];
                for (int64_t k = best; k < n - 1; ++k) a[k] = a[k + 1];
                a[n - 1] = v;
            }
        }
    }
    return true;
}

constexpr int64_t kMaxLead = 64;  // leading dims a strided job takes (more: contiguous copies)

// cos/sin (half width, broadcastable to x.shape[:-1] + (r/2,)) strides aligned with x's
// leading dims, 0 where they broadcast. false: more than kMaxLead leading dims.
bool table_strides(const Tensor& x, const Tensor& cos, const Tensor& sin, int64_t* cst, int64_t* sst) {
    const int64_t L = x.dim() - 1, off = L - (cos.dim() - 1);  // table dim i - off aligns with x's dim i
    if (L > kMaxLead) return false;
    for (int64_t i = 0; i < L; ++i) {
        const int64_t ci = i - off;
        const bool b = ci < 0 || cos.size(ci) == 1;
        cst[i] = b ? 0 : cos.stride(ci);
        sst[i] = b ? 0 : sin.stride(ci);
    }
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
    int64_t cst[kMaxLead], sst[kMaxLead], pst[kMaxLead] = {};
    if (!unit_last(x) || !unit_last(out) || !table_strides(x, cos, sin, cst, sst)) return false;
    job_head(j, x, out, cos.size(-1), layout, conj);
    j.c = reinterpret_cast<intptr_t>(cos.data_ptr());
    j.s = reinterpret_cast<intptr_t>(sin.data_ptr());
    return fill_dims(j, x, out, cst, sst, pst);
}

// The streaming-store threshold: ROPEKIT_STREAM_BYTES (a byte count >= 0, read once; 0
// streams every out-of-place output the kernel can), else kNtBytes. Streaming stores skip the
// read-for-ownership of the output's lines and leave it out of the caches: faster for the call
// alone, slower for whatever reads the output next while it would still fit in the last-level
// cache (benchmarks/bench_stream.py measures both on a machine).
int64_t stream_bytes() {
    static const int64_t v = [] {
        const char* env = std::getenv("ROPEKIT_STREAM_BYTES");
        if (env == nullptr || *env == '\0') return kNtBytes;
        char* end = nullptr;
        errno = 0;
        const long long n = std::strtoll(env, &end, 10);
        if (*end != '\0' || errno != 0 || n < 0 || !std::isdigit((unsigned char)*env)) {
            TORCH_WARN("ropekit: ROPEKIT_STREAM_BYTES expected a byte count >= 0 (e.g. 8388608), got '", env,
                       "'; using the default, ", kNtBytes);
            return kNtBytes;
        }
        return (int64_t)n;
    }();
    return v;
}

void run_jobs(RkJob* jobs, int64_t njobs) {
    int64_t total = 0, bytes = 0;
    for (int64_t n = 0; n < njobs; ++n) {
        total += jobs[n].nrows;
        bytes += 2 * jobs[n].nrows * jobs[n].d * element_bytes(jobs[n].dtype);
    }
    if (total == 0) return;
    const Level& lv = level();
    lv.finish(jobs, njobs, bytes, stream_bytes());
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

// The tables as one contiguous row per row of x (for the layouts the strided jobs do not take).
std::pair<Tensor, Tensor> expanded_tables(const Tensor& x, const Tensor& c, const Tensor& s) {
    std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
    shape.back() = c.size(-1);
    return {c.expand(shape).contiguous().view({-1, c.size(-1)}), s.expand(shape).contiguous().view({-1, c.size(-1)})};
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
    const Tensor xc = x.contiguous().view({-1, x.size(-1)}), oc = at::empty_like(xc);
    auto [cc, sc] = expanded_tables(x, c, s);
    TORCH_INTERNAL_ASSERT(strided_job(j, xc, oc, cc, sc, layout, conj));
    run_jobs(&j, 1);
    out.copy_(oc.view(x.sizes()));
}

// ---------------------------------------------------------------------------------------
// CPU kernels

Tensor rotary_cpu(const Tensor& x, const Tensor& cos, const Tensor& sin, c10::string_view layout, bool conjugate) {
    const int64_t lay = validate_rotary(x, cos, sin, layout, false, nullptr);
    Tensor out = new_cpu_out(x);
    rotate_into(x, cos, sin, lay, conjugate, out);
    return out;
}

void rotary__cpu(Tensor& x, const Tensor& cos, const Tensor& sin, c10::string_view layout, bool conjugate) {
    const int64_t lay = validate_rotary(x, cos, sin, layout, true, nullptr);
    rotate_into(x, cos, sin, lay, conjugate, x);
}

void rotary_out_cpu(const Tensor& x, const Tensor& cos, const Tensor& sin, c10::string_view layout, bool conjugate,
                    Tensor& out) {
    const int64_t lay = validate_rotary(x, cos, sin, layout, false, &out);
    rotate_into(x, cos, sin, lay, conjugate, out);
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
    const int64_t lay = validate_qk(q, k, cos, sin, layout, false);
    Tensor qo = new_cpu_out(q), ko = new_cpu_out(k);
    rotate_qk_into(q, k, cos, sin, lay, conjugate, qo, ko);
    return {qo, ko};
}

void rotary_qk__cpu(Tensor& q, Tensor& k, const Tensor& cos, const Tensor& sin, c10::string_view layout, bool conjugate) {
    const int64_t lay = validate_qk(q, k, cos, sin, layout, true);
    rotate_qk_into(q, k, cos, sin, lay, conjugate, q, k);
}

// --- gather: table rows picked by position ------------------------------------------------

// The positions as contiguous int64 ([b] per sample read as [b, 1]).
Tensor long_positions(const Tensor& pos, const GatherCall& g) {
    if (pos.scalar_type() == at::kUInt64 && pos.is_cpu() && pos.numel()) {  // past 2^63 it would wrap to negative
        const Tensor pc = pos.contiguous();  // (torch has no max for uint64)
        const uint64_t* pp = static_cast<const uint64_t*>(pc.const_data_ptr());
        const uint64_t hi = *std::max_element(pp, pp + pc.numel());
        RK_CHECK(hi <= (uint64_t)INT64_MAX, "positions below the table length, got a position of ", hi,
                 ". Fix: grow the tables (RotaryEmbedding.tables(max_position + 1)) or fix the positions");
    }
    const Tensor p = pos.scalar_type() == at::kLong ? pos.contiguous() : pos.to(at::kLong).contiguous();
    return g.per_sample ? p.view({p.size(0), 1}) : p;
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
    const GatherCall g = validate_gather(q, k, ct, st, positions, format, layout, false);
    Tensor qo = new_cpu_out(q), ko = new_cpu_out(k);
    gather_into(q, k, ct, st, long_positions(positions, g), g.f, g.layout, conjugate, qo, ko);
    return {qo, ko};
}

void rotary_gather__cpu(Tensor& q, Tensor& k, const Tensor& ct, const Tensor& st, const Tensor& positions,
                        c10::string_view format, c10::string_view layout, bool conjugate) {
    const GatherCall g = validate_gather(q, k, ct, st, positions, format, layout, true);
    gather_into(q, k, ct, st, long_positions(positions, g), g.f, g.layout, conjugate, q, k);
}

// --- fused per-head RMSNorm + rotation -----------------------------------------------------

at::ScalarType compute_type(int64_t dt) { return dt == 3 ? at::kDouble : at::kFloat; }

// weight_offset + weight in the compute type, contiguous [d]: what w.to(float32) + offset
// gives in torch (the weight rounded to the compute type, then one rounded addition).
template <typename C>
void fill_weight(const Tensor& w, double offset, C* out) {
    const int64_t d = w.size(0), st = w.stride(0);
    const C off = (C)offset;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, w.scalar_type(), "ropekit_weight", [&] {
        const scalar_t* p = w.const_data_ptr<scalar_t>();
        if (st == 1) {  // the usual weight: a vector loop (-O2 alone leaves it scalar)
            _Pragma("omp simd") for (int64_t i = 0; i < d; ++i) out[i] = (C)(p[i]) + off;
        } else
            for (int64_t i = 0; i < d; ++i) out[i] = (C)(p[i * st]) + off;
    });
}

Tensor weight_prime(const Tensor& w, int64_t dt, double offset) {
    Tensor out = at::empty({w.size(0)}, w.options().dtype(compute_type(dt)));
    if (dt == 3)
        fill_weight<double>(w, offset, out.data_ptr<double>());
    else
        fill_weight<float>(w, offset, out.data_ptr<float>());
    return out;
}

// One norm job: out = rot(norm(x)) (g undefined) or out = dx of that (g defined). c/s: compute
// type, unit last stride, broadcast to x.shape[:-1] + (r/2,); w: weight_prime; rstd: [rows].
bool norm_job(RkNormJob& j, const Tensor& x, const Tensor& out, const Tensor& c, const Tensor& s, const void* w,
              const Tensor& rstd, const Tensor& g, double eps, int64_t layout, int64_t dwp) {
    int64_t cs[kMaxLead], ss[kMaxLead], none[kMaxLead] = {};
    if (!unit_last(x) || !unit_last(out) || (g.defined() && !unit_last(g)) || !table_strides(x, c, s, cs, ss))
        return false;
    std::memset(&j, 0, sizeof j);
    j.dtype = dtype_code(x.scalar_type());
    j.layout = layout;
    j.half = c.size(-1);
    j.d = x.size(-1);
    j.eps = eps;
    j.x = reinterpret_cast<intptr_t>(x.data_ptr());
    j.o = reinterpret_cast<intptr_t>(out.data_ptr());
    j.c = reinterpret_cast<intptr_t>(c.data_ptr());
    j.s = reinterpret_cast<intptr_t>(s.data_ptr());
    j.w = reinterpret_cast<intptr_t>(w);
    j.rstd = rstd.defined() ? reinterpret_cast<intptr_t>(rstd.data_ptr()) : 0;
    j.g = g.defined() ? reinterpret_cast<intptr_t>(g.data_ptr()) : 0;
    j.dwp = dwp;
    const int64_t* in[5] = {x.strides().data(), out.strides().data(), cs, ss, g.defined() ? g.strides().data() : none};
    int64_t* dst[5] = {j.xs, j.os, j.cs, j.ss, j.gs};
    return merge_dims(x, in, j.size, dst, j.nd, j.nrows);
}

int64_t norm_blocks(int64_t rows) { return (rows + RK_NORM_BLOCK - 1) / RK_NORM_BLOCK; }

// Forward (bwd = false: units are rows) or backward (units are RK_NORM_BLOCK-row blocks) of
// the jobs, split over torch's thread pool above kParallelBytes.
void run_norm_jobs(const RkNormJob* jobs, int64_t njobs, bool bwd) {
    int64_t units = 0, bytes = 0;
    for (int64_t n = 0; n < njobs; ++n) {
        units += bwd ? norm_blocks(jobs[n].nrows) : jobs[n].nrows;
        bytes += (bwd ? 3 : 2) * jobs[n].nrows * jobs[n].d * element_bytes(jobs[n].dtype);
    }
    if (units == 0) return;
    const Level& lv = level();
    auto fn = bwd ? lv.norm_bwd : lv.norm_fwd;
    if (bytes < kParallelBytes || units == 1) {
        fn(jobs, njobs, 0, units);
        return;
    }
    const int64_t grain = std::max<int64_t>(1, units * kGrainBytes / bytes);
    at::parallel_for(0, units, grain, [&](int64_t b, int64_t e) { fn(jobs, njobs, b, e); });
}

Tensor new_rstd(const Tensor& x, int64_t dt) {
    return at::empty(x.sizes().slice(0, x.dim() - 1), x.options().dtype(compute_type(dt)));
}

// outs[i] = rot(norm(xs[i])) for the non-empty tensors, one kernel call; returns the rstds.
// (Small vectors and the weights on the stack: at decode sizes the heap allocations of the
// bookkeeping cost as much as the rows.)
std::vector<Tensor> norm_fwd_into(c10::ArrayRef<Tensor> xs, c10::ArrayRef<Tensor> ws, const Tensor& cos,
                                  const Tensor& sin, double eps, double offset, int64_t layout,
                                  c10::ArrayRef<Tensor> outs, bool want_rstd = true) {
    const size_t n = xs.size();
    TORCH_INTERNAL_ASSERT(n <= 2);
    std::vector<Tensor> rstd;
    if (want_rstd) rstd.resize(n);
    c10::SmallVector<Tensor, 8> keep;  // temporaries the jobs point into
    RkNormJob jobs[2];
    int64_t njobs = 0;
    c10::SmallVector<std::pair<Tensor, Tensor>, 2> copies;  // (contiguous result, destination)
    c10::SmallVector<double, 256> wbuf[2];  // weight_offset + weight in the compute type (floats: half of it)
    for (size_t i = 0; i < n; ++i) {
        const Tensor& x = xs[i];
        const int64_t dt = dtype_code(x.scalar_type());
        if (want_rstd) rstd[i] = new_rstd(x, dt);
        if (x.numel() == 0) continue;
        if (!supported_dtype(x)) {  // no float16 kernel in this build: the same bits through float32
            const Tensor xf = x.to(at::kFloat), of = at::empty_like(xf);
            auto r = norm_fwd_into({xf}, {ws[i]}, cos, sin, eps, offset, layout, {of}, want_rstd);
            if (want_rstd) rstd[i] = r[0];
            outs[i].copy_(of);
            continue;
        }
        const Tensor c = compute_tables(cos, dt), s = compute_tables(sin, dt);
        const Tensor& rs = want_rstd ? rstd[i] : Tensor();
        const Tensor& wi = ws[i];
        wbuf[i].resize((size_t)wi.size(0));
        void* w = wbuf[i].data();
        if (dt == 3)
            fill_weight<double>(wi, offset, static_cast<double*>(w));
        else
            fill_weight<float>(wi, offset, static_cast<float*>(w));
        keep.append({c, s});
        RkNormJob& j = jobs[njobs];
        if (!norm_job(j, x, outs[i], c, s, w, rs, Tensor(), eps, layout, 0)) {
            const Tensor xc = x.contiguous().view({-1, x.size(-1)}), oc = at::empty_like(xc);
            auto [ce, se] = expanded_tables(x, c, s);
            keep.append({xc, oc, ce, se});
            TORCH_INTERNAL_ASSERT(norm_job(j, xc, oc, ce, se, w, rs, Tensor(), eps, layout, 0));
            copies.emplace_back(oc, outs[i]);
        }
        ++njobs;
    }
    run_norm_jobs(jobs, njobs, false);
    for (auto& [src, dst] : copies) dst.copy_(src.view(dst.sizes()));
    return rstd;
}

// Sum the weight-gradient partials [blocks, d] in block order (double accumulation for float32).
Tensor reduce_partials(const Tensor& part, const Tensor& w) {
    const int64_t nb = part.size(0), d = part.size(1);
    std::vector<double> acc((size_t)d, 0.0);
    if (part.scalar_type() == at::kDouble) {
        const double* p = part.const_data_ptr<double>();
        for (int64_t b = 0; b < nb; ++b)
            for (int64_t i = 0; i < d; ++i) acc[i] += p[b * d + i];
    } else {
        const float* p = part.const_data_ptr<float>();
        for (int64_t b = 0; b < nb; ++b)
            for (int64_t i = 0; i < d; ++i) acc[i] += (double)p[b * d + i];
    }
    Tensor out = at::empty({d}, w.options().dtype(at::kDouble));
    std::memcpy(out.data_ptr<double>(), acc.data(), (size_t)d * sizeof(double));
    Tensor r = out.to(w.scalar_type()).contiguous();
    // NaNs stored as the canonical quiet NaN (docs/numerics.md): inf + -inf in the double sum
    // gives x86's negative default NaN, and torch's vectorised narrowing casts store other NaN
    // bits than its scalar ones (bfloat16: 0xFFFF against 0x7FC0)
    auto put = [&](auto bits) {
        auto* rp = static_cast<decltype(bits)*>(r.data_ptr());
        for (int64_t i = 0; i < d; ++i)
            if (std::isnan(acc[i])) rp[i] = bits;
    };
    switch (r.element_size()) {
        case 8: put(uint64_t{0x7FF8000000000000ull}); break;
        case 4: put(uint32_t{0x7FC00000u}); break;
        default: put(uint16_t(r.scalar_type() == at::kBFloat16 ? 0x7FC0u : 0x7E00u));
    }
    return r;
}

// dx (and dw) for each (g, x, w, rstd); one kernel call over all of them.
std::vector<Tensor> norm_bwd(const std::vector<Tensor>& gs, const std::vector<Tensor>& xs, const std::vector<Tensor>& ws,
                             const std::vector<Tensor>& rstds, const Tensor& cos, const Tensor& sin, double offset,
                             int64_t layout) {
    const size_t n = xs.size();
    std::vector<Tensor> dx(n), dw(n), parts(n), keep;
    std::vector<RkNormJob> jobs;
    std::vector<std::pair<Tensor, Tensor>> copies;
    for (size_t i = 0; i < n; ++i) {
        const Tensor& x = xs[i];
        const Tensor g = gs[i].scalar_type() == x.scalar_type() ? gs[i] : gs[i].to(x.scalar_type());
        dx[i] = new_cpu_out(g);
        const int64_t dt = dtype_code(x.scalar_type()), d = x.size(-1);
        if (x.numel() == 0) {
            dw[i] = at::zeros({d}, ws[i].options());
            continue;
        }
        if (!supported_dtype(x)) {
            auto r = norm_bwd({g.to(at::kFloat)}, {x.to(at::kFloat)}, {ws[i]}, {rstds[i]}, cos, sin, offset, layout);
            dx[i].copy_(r[0]);
            dw[i] = r[1];
            continue;
        }
        const Tensor c = compute_tables(cos, dt), s = compute_tables(sin, dt), w = weight_prime(ws[i], dt, offset);
        const Tensor r = rstds[i].contiguous();
        parts[i] = at::empty({norm_blocks(x.numel() / d), d}, x.options().dtype(compute_type(dt)));
        const int64_t dwp = reinterpret_cast<intptr_t>(parts[i].data_ptr());
        keep.insert(keep.end(), {g, c, s, w, r});
        RkNormJob j;
        if (!norm_job(j, x, dx[i], c, s, w.data_ptr(), r, g, 0.0, layout, dwp)) {
            const Tensor xc = x.contiguous().view({-1, d}), gc = g.contiguous().view({-1, d}), oc = at::empty_like(xc);
            auto [ce, se] = expanded_tables(x, c, s);
            keep.insert(keep.end(), {xc, gc, oc, ce, se});
            TORCH_INTERNAL_ASSERT(norm_job(j, xc, oc, ce, se, w.data_ptr(), r, gc, 0.0, layout, dwp));
            copies.emplace_back(oc, dx[i]);
        }
        jobs.push_back(j);
    }
    run_norm_jobs(jobs.data(), (int64_t)jobs.size(), true);
    for (auto& [src, dst] : copies) dst.copy_(src.view(dst.sizes()));
    std::vector<Tensor> out(dx);
    for (size_t i = 0; i < n; ++i) out.push_back(parts[i].defined() ? reduce_partials(parts[i], ws[i]) : dw[i]);
    return out;  // dx..., dw...
}

using Tensor4 = std::tuple<Tensor, Tensor, Tensor, Tensor>;

Tensor4 qk_norm_rotary_fwd_cpu(const Tensor& q, const Tensor& k, const Tensor& qw, const Tensor& kw, const Tensor& cos,
                               const Tensor& sin, double eps, double offset, c10::string_view layout) {
    const int64_t lay = validate_qk_norm(q, k, qw, kw, cos, sin, eps, offset, layout, false);
    Tensor qo = new_cpu_out(q), ko = new_cpu_out(k);
    auto r = norm_fwd_into({q, k}, {qw, kw}, cos, sin, eps, offset, lay, {qo, ko});
    return {qo, ko, r[0], r[1]};
}

std::tuple<Tensor, Tensor> qk_norm_rotary_fwd__cpu(Tensor& q, Tensor& k, const Tensor& qw, const Tensor& kw,
                                                   const Tensor& cos, const Tensor& sin, double eps, double offset,
                                                   c10::string_view layout) {
    const int64_t lay = validate_qk_norm(q, k, qw, kw, cos, sin, eps, offset, layout, true);
    auto r = norm_fwd_into({q, k}, {qw, kw}, cos, sin, eps, offset, lay, {q, k});
    return {r[0], r[1]};
}

// the public ops: no inverse RMS kept (the autograd kernel calls the _fwd ops when it needs them)
std::tuple<Tensor, Tensor> qk_norm_rotary_cpu(const Tensor& q, const Tensor& k, const Tensor& qw, const Tensor& kw,
                                              const Tensor& cos, const Tensor& sin, double eps, double offset,
                                              c10::string_view layout) {
    const int64_t lay = validate_qk_norm(q, k, qw, kw, cos, sin, eps, offset, layout, false);
    Tensor qo = new_cpu_out(q), ko = new_cpu_out(k);
    norm_fwd_into({q, k}, {qw, kw}, cos, sin, eps, offset, lay, {qo, ko}, false);
    return {qo, ko};
}

void qk_norm_rotary__cpu(Tensor& q, Tensor& k, const Tensor& qw, const Tensor& kw, const Tensor& cos, const Tensor& sin,
                         double eps, double offset, c10::string_view layout) {
    const int64_t lay = validate_qk_norm(q, k, qw, kw, cos, sin, eps, offset, layout, true);
    norm_fwd_into({q, k}, {qw, kw}, cos, sin, eps, offset, lay, {q, k}, false);
}

Tensor4 qk_norm_rotary_bwd_cpu(const Tensor& gq, const Tensor& gk, const Tensor& q, const Tensor& k, const Tensor& qw,
                               const Tensor& kw, const Tensor& rq, const Tensor& rk, const Tensor& cos, const Tensor& sin,
                               double offset, c10::string_view layout) {
    const int64_t lay = validate_qk_norm_bwd(gq, gk, q, k, qw, kw, rq, rk, cos, sin, offset, layout);
    auto r = norm_bwd({gq, gk}, {q, k}, {qw, kw}, {rq, rk}, cos, sin, offset, lay);
    return {r[0], r[1], r[2], r[3]};
}

std::string cpu_capability() { return level().name; }

// ropekit::refused when a compiled graph runs: the call was accepted when it was traced (the
// graph's guards pin the sizes, strides, dtypes and devices then checked), nothing to do
Tensor refused_probe(c10::string_view, const c10::List<c10::optional<Tensor>>& tensors, std::vector<std::string>,
                     c10::List<bool>, c10::ArrayRef<double>) {
    for (const c10::optional<Tensor>& t : tensors)
        if (t.has_value() && t->defined()) return at::empty({0}, t->options());
    return at::empty({0});
}

// cos_sin's validator (the CPU kernel and the fake, through ropekit.ops.check)
void validate_cos_sin(const Tensor& angles) {
    RK_CHECK(angles.defined() && angles.scalar_type() == at::kDouble, "float64 angles, got ",
             angles.defined() ? dt_str(angles.scalar_type()) : std::string("None"),
             ". Fix: compute angles in float64 (ropekit.angles does)");
}

// cos and sin of float64 angles, element by element (kernel.cpp, rk_sincos_*: the same bits
// at every level, thread split and process; see there)
std::tuple<Tensor, Tensor> cos_sin_cpu(const Tensor& angles) {
    validate_cos_sin(angles);
    const Tensor a = angles.contiguous();
    Tensor c = at::empty(a.sizes(), a.options()), s = at::empty(a.sizes(), a.options());
    const double* ap = a.const_data_ptr<double>();
    double *cp = c.mutable_data_ptr<double>(), *sp = s.mutable_data_ptr<double>();
    const auto fn = level().sincos;
    at::parallel_for(0, a.numel(), 4096, [&](int64_t lo, int64_t hi) { fn(ap + lo, sp + lo, cp + lo, hi - lo); });
    return {c, s};
}

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

using NormSig = std::tuple<Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                                           const Tensor&, double, double, c10::string_view);
using NormInSig = void(Tensor&, Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&, double, double,
                       c10::string_view);
using NormFwdSig = Tensor4(const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&, double,
                           double, c10::string_view);
using NormFwdInSig = std::tuple<Tensor, Tensor>(Tensor&, Tensor&, const Tensor&, const Tensor&, const Tensor&,
                                                const Tensor&, double, double, c10::string_view);
using NormBwdSig = Tensor4(const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                           const Tensor&, const Tensor&, const Tensor&, const Tensor&, double, c10::string_view);

Tensor4 call_norm_fwd(const Tensor& q, const Tensor& k, const Tensor& qw, const Tensor& kw, const Tensor& c,
                      const Tensor& s, double eps, double off, c10::string_view l) {
    static auto op = RK_OP("qk_norm_rotary_fwd", NormFwdSig);
    return op.call(q, k, qw, kw, c, s, eps, off, l);
}
Tensor4 call_norm_bwd(const Tensor& gq, const Tensor& gk, const Tensor& q, const Tensor& k, const Tensor& qw,
                      const Tensor& kw, const Tensor& rq, const Tensor& rk, const Tensor& c, const Tensor& s, double off,
                      c10::string_view l) {
    static auto op = RK_OP("qk_norm_rotary_bwd", NormBwdSig);
    return op.call(gq, gk, q, k, qw, kw, rq, rk, c, s, off, l);
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

void qk_norm_rotary__adinplace(c10::DispatchKeySet ks, Tensor& q, Tensor& k, const Tensor& qw, const Tensor& kw,
                               const Tensor& c, const Tensor& s, double eps, double off, c10::string_view l) {
    static auto op = RK_OP("qk_norm_rotary_", NormInSig);
    op.redispatch(ks & c10::after_ADInplaceOrView_keyset, q, k, qw, kw, c, s, eps, off, l);
    torch::autograd::increment_version(q);
    torch::autograd::increment_version(k);
}

std::tuple<Tensor, Tensor> qk_norm_rotary_fwd__adinplace(c10::DispatchKeySet ks, Tensor& q, Tensor& k, const Tensor& qw,
                                                         const Tensor& kw, const Tensor& c, const Tensor& s, double eps,
                                                         double off, c10::string_view l) {
    static auto op = RK_OP("qk_norm_rotary_fwd_", NormFwdInSig);
    auto r = op.redispatch(ks & c10::after_ADInplaceOrView_keyset, q, k, qw, kw, c, s, eps, off, l);
    torch::autograd::increment_version(q);
    torch::autograd::increment_version(k);
    return r;
}

// ---------------------------------------------------------------------------------------
// Autograd: d/dx R(θ)x = R(θ)ᵀ = R(-θ), the same op conjugated. Only the tables (and the
// positions) are saved. The tables themselves get no gradient: a call whose tables require
// grad is refused (the Python API sends learnable tables to the eager formula).

// Every autograd kernel asks this first, with its differentiable inputs. A forward-mode AD
// tangent (torch.autograd.forward_ad.make_dual; grad mode does not turn forward AD off) is
// refused: the operators have no forward derivative, and the tangent would be dropped without
// a word. ropekit's Python functions take the eager formula for dual tensors instead.
bool grad_on(std::initializer_list<const Tensor*> ts) {
    for (const Tensor* t : ts)
        RK_CHECK(!(t->defined() && t->_fw_grad(/*level=*/0).defined()),
                 "tensors without a forward-mode AD tangent (the ropekit operators have no forward derivative), got "
                 "a dual tensor (torch.autograd.forward_ad.make_dual). Fix: call the ropekit.apply_* functions (they "
                 "take the eager formula for dual tensors), or torch.func.jvp");
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
    // torch's rule for its own in-place ops, checked here before anything is written (torch
    // checks it after the kernel, when the view's history is rebased)
    RK_CHECK(!(t.requires_grad() && t.is_view() && t._base().is_leaf() && t._base().requires_grad()),
             "inplace=True on a tensor autograd may modify, got ", name,
             ": a view of a leaf tensor that requires grad. Fix: use inplace=False, rotate a clone(), or call under "
             "torch.no_grad()");
    // the same for views autograd forbids to modify (torch raises after the kernel has written)
    if (t.requires_grad() && t.is_view()) {
        const auto* vm = torch::autograd::impl::get_view_autograd_meta(t);
        const auto cm = vm != nullptr ? vm->get_creation_meta() : torch::autograd::CreationMeta::DEFAULT;
        RK_CHECK(cm != torch::autograd::CreationMeta::MULTI_OUTPUT_NODE, "inplace=True on a tensor autograd may modify, got ",
                 name, ": one of several views returned by one call (unbind / split / chunk), which autograd refuses to "
                 "modify in place. Fix: take the view by indexing (e.g. qkv[:, :, 0] instead of qkv.unbind(2)[0]), "
                 "rotate a clone(), or use inplace=False");
        RK_CHECK(cm == torch::autograd::CreationMeta::DEFAULT, "inplace=True on a tensor autograd may modify, got ", name,
                 ": a view autograd refuses to modify in place (made in no_grad or inference mode, or inside a custom "
                 "autograd Function). Fix: rotate a clone(), or use inplace=False");
    }
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

// The q/k Functions return both outputs; one whose own inputs need no gradient (only q
// requires grad, say) is marked non-differentiable, as the torch formula leaves it: no
// requires_grad, no grad_fn keeping the graph alive (a KV cache written from it), no
// gradient formed for it in the backward.
// (One call: mark_non_differentiable replaces the set it was given before.)
void mark_constant_outputs(AutogradContext* ctx, std::initializer_list<std::pair<const Tensor*, bool>> outs) {
    variable_list constant;
    for (const auto& [t, differentiable] : outs)
        if (!differentiable) constant.push_back(*t);
    if (!constant.empty()) ctx->mark_non_differentiable(constant);
}

class RotaryQKFn : public torch::autograd::Function<RotaryQKFn> {
   public:
    static variable_list forward(AutogradContext* ctx, const Tensor& q, const Tensor& k, const Tensor& c, const Tensor& s,
                                 std::string layout, bool conj) {
        at::AutoDispatchBelowADInplaceOrView guard;
        auto [qo, ko] = call_qk(q, k, c, s, layout, conj);
        ctx->set_materialize_grads(false);  // an unused output's gradient stays undefined: no work for it
        mark_constant_outputs(ctx, {{&qo, q.requires_grad()}, {&ko, k.requires_grad()}});
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
        mark_constant_outputs(ctx, {{&qo, q.requires_grad()}, {&ko, k.requires_grad()}});
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

// cos_sin: d cos = -sin dx, d sin = cos dx, from the saved outputs (aten ops: differentiable
// again, through the outputs' own graph)
using CosSinSig = std::tuple<Tensor, Tensor>(const Tensor&);
std::tuple<Tensor, Tensor> call_cos_sin(const Tensor& x) {  // below autograd
    at::AutoDispatchBelowADInplaceOrView guard;
    static auto op = RK_OP("cos_sin", CosSinSig);
    return op.call(x);
}

class CosSinFn : public torch::autograd::Function<CosSinFn> {
   public:
    static variable_list forward(AutogradContext* ctx, const Tensor& x) {
        auto [c, s] = call_cos_sin(x);
        ctx->save_for_backward({c, s});
        return {c, s};
    }
    static variable_list backward(AutogradContext* ctx, variable_list g) {
        const auto saved = ctx->get_saved_variables();
        Tensor dx;
        if (g[0].defined()) dx = -(g[0] * saved[1]);
        if (g[1].defined()) dx = dx.defined() ? dx + g[1] * saved[0] : g[1] * saved[0];
        return {dx};
    }
};

std::tuple<Tensor, Tensor> cos_sin_autograd(const Tensor& x) {
    if (!grad_on({&x})) return call_cos_sin(x);
    auto r = CosSinFn::apply(x);
    return {r[0], r[1]};
}

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

// --- autograd of the fused norm + rotation ---------------------------------------------------
// Saved: q and k (a copy of each when rotated in place: their values are overwritten), the
// weights, the tables and the inverse RMS of every row (compute type: 4 bytes per head and
// token in float32). Backward: qk_norm_rotary_bwd, one pass over g, x and dx per tensor; the
// weight gradient is reduced in a fixed order (the same bits for any thread count).

// The backward of one tensor's norm + rotation written with differentiable ops (aten and the
// rotary op), for backward passes that build a graph (create_graph=True: second derivatives,
// gradgradcheck). Per row: x̂ = x·rstd, u = R(-θ)g, v = u·w', dx = rstd·(v - x̂·mean(v·x̂)),
// dw = Σ_rows u·x̂ — the formula of the fused kernel, in the compute dtype.
std::pair<Tensor, Tensor> norm_backward_graph(const Tensor& g, const Tensor& x, const Tensor& w, const Tensor& c,
                                              const Tensor& s, double eps, double off, const std::string& layout) {
    const auto cdt = compute_type(x.scalar_type());
    const Tensor xf = x.to(cdt), wp = w.to(cdt) + off;
    const Tensor rstd = at::rsqrt(xf.pow(2).mean(-1, true) + eps);
    const Tensor xhat = xf * rstd;
    const Tensor u = call_rotary(g.to(cdt), c, s, layout, true);
    const Tensor v = u * wp;
    const Tensor dx = rstd * (v - xhat * (v * xhat).mean(-1, true));
    Tensor dw = u * xhat;
    if (x.dim() > 1) {
        std::vector<int64_t> lead(x.dim() - 1);
        for (int64_t i = 0; i < x.dim() - 1; ++i) lead[i] = i;
        dw = dw.sum(lead);
    }
    return {dx.to(x.scalar_type()), dw.to(w.scalar_type())};
}

class QKNormFn : public torch::autograd::Function<QKNormFn> {
   public:
    static variable_list forward(AutogradContext* ctx, const Tensor& q, const Tensor& k, const Tensor& qw,
                                 const Tensor& kw, const Tensor& c, const Tensor& s, double eps, double off,
                                 std::string layout) {
        at::AutoDispatchBelowADInplaceOrView guard;
        auto [qo, ko, rq, rk] = call_norm_fwd(q, k, qw, kw, c, s, eps, off, layout);
        ctx->set_materialize_grads(false);  // an unused output: no gradient work (and none for its weight)
        mark_constant_outputs(ctx, {{&qo, q.requires_grad() || qw.requires_grad()},
                                    {&ko, k.requires_grad() || kw.requires_grad()}, {&rq, false}, {&rk, false}});
        ctx->save_for_backward({q, k, qw, kw, rq, rk, c, s});
        ctx->saved_data["offset"] = off;
        ctx->saved_data["eps"] = eps;
        ctx->saved_data["layout"] = layout;
        return {qo, ko, rq, rk};
    }
    static variable_list backward(AutogradContext* ctx, variable_list g) {
        const auto v = ctx->get_saved_variables();
        const double off = ctx->saved_data["offset"].toDouble();
        const bool hq = g[0].defined(), hk = g[1].defined();
        Tensor dq, dk, dqw, dkw;
        if (at::GradMode::is_enabled()) {  // create_graph: a differentiable backward
            const double eps = ctx->saved_data["eps"].toDouble();
            if (hq) std::tie(dq, dqw) = norm_backward_graph(g[0], v[0], v[2], v[6], v[7], eps, off, layout_of(ctx));
            if (hk) std::tie(dk, dkw) = norm_backward_graph(g[1], v[1], v[3], v[6], v[7], eps, off, layout_of(ctx));
        } else if (hq && hk) {
            std::tie(dq, dk, dqw, dkw) = call_norm_bwd(g[0], g[1], v[0], v[1], v[2], v[3], v[4], v[5], v[6], v[7], off,
                                                       layout_of(ctx));
        } else if (hq || hk) {  // one side: the other passed as an empty [0, d] tensor (no work, no table checks)
            const int i = hq ? 0 : 1;
            const Tensor& x = v[i];
            const Tensor none = at::empty({0, x.size(-1)}, x.options()), r0 = at::empty({0}, v[4 + i].options());
            auto r = call_norm_bwd(g[i], none, x, none, v[2 + i], v[2 + i], v[4 + i], r0, v[6], v[7], off,
                                   layout_of(ctx));
            (hq ? dq : dk) = std::get<0>(r);
            (hq ? dqw : dkw) = std::get<2>(r);
        }
        return {dq, dk, dqw, dkw, Tensor(), Tensor(), Tensor(), Tensor(), Tensor()};
    }
};

// One tensor (q or k) of an in-place norm + rotation already applied: marks it modified and
// records its backward (the norm of q depends on q and q_weight only).
class NormRotatedFn : public torch::autograd::Function<NormRotatedFn> {
   public:
    static variable_list forward(AutogradContext* ctx, const Tensor& x, const Tensor& w, const Tensor& x0,
                                 const Tensor& rstd, const Tensor& c, const Tensor& s, double eps, double off,
                                 std::string layout) {
        ctx->mark_dirty({x});
        ctx->save_for_backward({x0, w, rstd, c, s});
        ctx->saved_data["offset"] = off;
        ctx->saved_data["eps"] = eps;
        ctx->saved_data["layout"] = layout;
        return {x};
    }
    static variable_list backward(AutogradContext* ctx, variable_list g) {
        const auto v = ctx->get_saved_variables();
        const Tensor& x0 = v[0];
        if (at::GradMode::is_enabled()) {  // create_graph: a differentiable backward
            auto [dx, dw] = norm_backward_graph(g[0], x0, v[1], v[3], v[4], ctx->saved_data["eps"].toDouble(),
                                                ctx->saved_data["offset"].toDouble(), layout_of(ctx));
            return {dx, dw, Tensor(), Tensor(), Tensor(), Tensor(), Tensor(), Tensor(), Tensor()};
        }
        const Tensor none = at::empty({0, x0.size(-1)}, x0.options()), r0 = at::empty({0}, v[2].options());
        auto [dx, dn, dw, dwn] = call_norm_bwd(g[0], none, x0, none, v[1], v[1], v[2], r0, v[3], v[4],
                                               ctx->saved_data["offset"].toDouble(), layout_of(ctx));
        return {dx, dw, Tensor(), Tensor(), Tensor(), Tensor(), Tensor(), Tensor(), Tensor()};
    }
};

std::tuple<Tensor, Tensor> qk_norm_rotary_autograd(const Tensor& q, const Tensor& k, const Tensor& qw, const Tensor& kw,
                                                   const Tensor& c, const Tensor& s, double eps, double off,
                                                   c10::string_view layout) {
    if (!grad_on({&q, &k, &qw, &kw, &c, &s})) {
        at::AutoDispatchBelowADInplaceOrView guard;
        auto r = call_norm_fwd(q, k, qw, kw, c, s, eps, off, layout);
        return {std::get<0>(r), std::get<1>(r)};
    }
    check_tables_no_grad(c, s);
    auto r = QKNormFn::apply(q, k, qw, kw, c, s, eps, off, std::string(layout));
    return {r[0], r[1]};
}

void qk_norm_rotary__autograd(c10::DispatchKeySet ks, Tensor& q, Tensor& k, const Tensor& qw, const Tensor& kw,
                              const Tensor& c, const Tensor& s, double eps, double off, c10::string_view layout) {
    if (!grad_on({&q, &k, &qw, &kw, &c, &s})) {
        static auto op = RK_OP("qk_norm_rotary_", NormInSig);
        op.redispatch(ks & c10::after_autograd_keyset, q, k, qw, kw, c, s, eps, off, layout);
        return;
    }
    check_tables_no_grad(c, s);
    check_not_leaf(q, "q");
    check_not_leaf(k, "k");
    // the inputs, before they are overwritten (checks first: nothing is copied for a refused call)
    validate_qk_norm(q, k, qw, kw, c, s, eps, off, layout, true);
    Tensor q0 = new_cpu_out(q), k0 = new_cpu_out(k);  // fresh and large: advised onto huge pages
    q0.copy_(q);  // recorded by autograd: a backward that builds a graph (create_graph) reaches q through q0
    k0.copy_(k);
    static auto op = RK_OP("qk_norm_rotary_fwd_", NormFwdInSig);
    auto [rq, rk] = op.redispatch(ks & c10::after_autograd_keyset, q, k, qw, kw, c, s, eps, off, layout);
    const std::string l(layout);
    if (q.requires_grad() || qw.requires_grad()) NormRotatedFn::apply(q, qw, q0, rq, c, s, eps, off, l);
    if (k.requires_grad() || kw.requires_grad()) NormRotatedFn::apply(k, kw, k0, rk, c, s, eps, off, l);
}

// The forward-with-rstd and backward steps of qk_norm_rotary are not differentiable
// themselves (qk_norm_rotary's autograd is, twice): a call that would need their gradient is
// refused rather than silently given none.
void refuse_grad(const char* op, std::initializer_list<const Tensor*> ts) {
    RK_CHECK(!grad_on(ts), "inputs of ropekit::", op, " that do not require grad (a step of qk_norm_rotary's autograd, ",
             "not differentiable itself), got inputs that require grad. Fix: call torch.ops.ropekit.qk_norm_rotary ",
             "(differentiable, also twice), or detach the inputs");
}

// The forward step is differentiable too (QKNormFn, its inverse RMS outputs not): an exported
// program's run_decompositions() (and AOTInductor) trace qk_norm_rotary down to this op and
// then run it on parameters that require grad.
Tensor4 qk_norm_rotary_fwd_autograd(const Tensor& q, const Tensor& k, const Tensor& qw, const Tensor& kw, const Tensor& c,
                                    const Tensor& s, double eps, double off, c10::string_view layout) {
    if (!grad_on({&q, &k, &qw, &kw, &c, &s})) {
        at::AutoDispatchBelowADInplaceOrView guard;
        return call_norm_fwd(q, k, qw, kw, c, s, eps, off, layout);
    }
    check_tables_no_grad(c, s);
    auto r = QKNormFn::apply(q, k, qw, kw, c, s, eps, off, std::string(layout));
    return {r[0], r[1], r[2], r[3]};
}

std::tuple<Tensor, Tensor> qk_norm_rotary_fwd__autograd(c10::DispatchKeySet ks, Tensor& q, Tensor& k, const Tensor& qw,
                                                        const Tensor& kw, const Tensor& c, const Tensor& s, double eps,
                                                        double off, c10::string_view layout) {
    refuse_grad("qk_norm_rotary_fwd_", {&q, &k, &qw, &kw, &c, &s});
    static auto op = RK_OP("qk_norm_rotary_fwd_", NormFwdInSig);
    return op.redispatch(ks & c10::after_autograd_keyset, q, k, qw, kw, c, s, eps, off, layout);
}

Tensor4 qk_norm_rotary_bwd_autograd(const Tensor& gq, const Tensor& gk, const Tensor& q, const Tensor& k,
                                    const Tensor& qw, const Tensor& kw, const Tensor& rq, const Tensor& rk,
                                    const Tensor& c, const Tensor& s, double off, c10::string_view layout) {
    refuse_grad("qk_norm_rotary_bwd", {&gq, &gk, &q, &k, &qw, &kw, &rq, &rk, &c, &s});
    at::AutoDispatchBelowADInplaceOrView guard;
    return call_norm_bwd(gq, gk, q, k, qw, kw, rq, rk, c, s, off, layout);
}

// ---------------------------------------------------------------------------------------
// serving: the rotation fused with the KV-cache write (rotary_cache_)
//
//   rotary_cache_(q!, k, cos_table, sin_table, positions, k_cache!, slots, v?, v_cache!?,
//                 k_out!?, cache_layout, layout) -> ()
//
// Tokens are the leading dims of q [..., hq, d] and k [..., hk, d]; positions and slots have
// exactly those dims. Per token t: q[t] is rotated in place by the table row positions[t];
// k[t] is rotated by the same row and written to the cache slot slots[t] (flat: block *
// block_size + offset; negative: not written); v[t] is copied to that slot of v_cache;
// k_out[t] (when given) receives the rotated k too. k is read once per token (its rows stay
// in L1 for the k_out copy). Caches: "nhd" [num_blocks, block_size, hk, d] — a dense
// [b, s_max, hk, d] cache is the same with block_size = s_max ("bshd") — and "hnd"
// [num_blocks, hk, block_size, d]; any strides with a unit last stride (the K and V halves of
// a packed cache are strided views of one buffer). Each token's rows are one job of the
// rotary kernel (kernel.cpp): the same bits as ropekit.apply_rotary of that row.

struct CacheCall {
    int64_t layout;  // pair layout code
    bool hnd;        // cache [num_blocks, h, block_size, d]
    int64_t lead;    // token dims of q/k
};

bool parse_cache_layout(c10::string_view s) {
    if (s == "nhd" || s == "bshd") return false;
    if (s == "hnd") return true;
    RK_CHECK(false, "cache_layout in ('nhd', 'bshd', 'hnd'), got '", std::string(s),
             "'. Fix: 'nhd' for [num_blocks, block_size, h, d] (and 'bshd' for a dense [b, s_max, h, d] cache: the "
             "same with block_size = s_max), 'hnd' for [num_blocks, h, block_size, d]");
    return false;
}

const Tensor* opt_ptr(const c10::optional<Tensor>& t) { return t.has_value() && t->defined() ? &*t : nullptr; }

// One cache against the tokens: 4-D, x's dtype/device, heads and head dim of x, unit last stride.
void check_cache(const Tensor& c, const Tensor& x, bool hnd, const char* cn, const char* xn) {
    const int64_t L = x.dim() - 2;
    RK_CHECK(c.defined() && c.dim() == 4, cn, hnd ? " [num_blocks, h, block_size, d] (cache_layout='hnd')"
                                                  : " [num_blocks, block_size, h, d] (cache_layout='nhd'/'bshd')",
             ", got ", c.defined() ? c10::str("shape ", shape_str(c)) : std::string("None"),
             ". Fix: pass the cache tensor itself (a dense [b, s_max, h, d] cache is 'bshd')");
    RK_CHECK(c.scalar_type() == x.scalar_type(), cn, " of ", xn, "'s dtype ", dt_str(x.scalar_type()),
             " (the rotated rows are rounded once, to the cache's dtype = ", xn, "'s), got ", cn, ".dtype=",
             dt_str(c.scalar_type()), ". Fix: convert ", xn, " to the cache dtype first (", xn, ".to(", cn, ".dtype))");
    check_same_device(x, c, xn, cn);
    const c10::SymInt ch = c.sym_size(hnd ? 1 : 2);
    RK_CHECK(ch == x.sym_size(L) && c.sym_size(3) == x.sym_size(L + 1), cn, " with ", xn, "'s heads and head dim (",
             x.sym_size(L), ", ", x.sym_size(L + 1), "), got ", cn, " ", shape_str(c), " for ", xn, " ", shape_str(x),
             ". Fix: ", hnd ? "cache_layout='hnd' reads [num_blocks, h, block_size, d]"
                            : "cache_layout='nhd' reads [num_blocks, block_size, h, d] (use 'hnd' for [num_blocks, h, "
                              "block_size, d])");
    if (!symbolic(c))
        RK_CHECK(c.size(3) <= 1 || c.stride(3) == 1, cn, " with unit stride in the head dim, got stride ", stride_str(c),
                 ". Fix: allocate the cache contiguous in its last dim (K/V halves of a packed cache as views are fine)");
    check_writable(c, cn);
}

// rotary_cache_ (the values of positions and slots are checked by the kernels: they need the data)
CacheCall validate_cache(const Tensor& q, const Tensor& k, const Tensor& ct, const Tensor& st, const Tensor& pos,
                         const Tensor& kc, const Tensor& slots, const Tensor* v, const Tensor* vc, const Tensor* ko,
                         c10::string_view cache_layout, c10::string_view layout) {
    check_x(q, "q");
    check_x(k, "k");
    check_same_device(q, k, "q", "k");
    RK_CHECK(q.dim() >= 2 && k.dim() == q.dim() &&
                 q.sym_sizes().slice(0, q.dim() - 2) == k.sym_sizes().slice(0, k.dim() - 2) &&
                 q.sym_size(-1) == k.sym_size(-1),
             "q [..., hq, d] and k [..., hk, d] with the same token dims and head dim, got q ", shape_str(q), " and k ",
             shape_str(k), ". Fix: pass one token per row of q and k (e.g. [t, h, d] packed, or [b, s, h, d])");
    const int64_t L = q.dim() - 2;
    const auto lead = q.sym_sizes().slice(0, L);
    check_row_tables(q, ct, st);
    for (const Tensor* t : {&pos, &slots}) {
        const char* nm = t == &pos ? "positions" : "slots";
        RK_CHECK(t->defined() && at::isIntegralType(t->scalar_type(), /*includeBool=*/false), nm,
                 " an integer tensor, got ", t->defined() ? dt_str(t->scalar_type()) : std::string("None"),
                 ". Fix: pass int64 ", nm);
        check_same_device(q, *t, "q", nm);
        RK_CHECK(t->sym_sizes() == lead, nm, " of the token dims of q/k ", c10::SymIntArrayRef(lead), " (one per token), got ",
                 nm, " of shape ", shape_str(*t), ". Fix: one ", t == &pos ? "position" : "cache slot",
                 " per token, shaped like q.shape[:-2]");
    }
    const bool hnd = parse_cache_layout(cache_layout);
    check_cache(kc, k, hnd, "k_cache", "k");
    RK_CHECK((v == nullptr) == (vc == nullptr), "v and v_cache together (or neither), got ", v ? "v" : "v_cache",
             " alone. Fix: pass both to write the values, or neither");
    if (v != nullptr) {
        check_x(*v, "v");
        check_same_device(q, *v, "q", "v");
        RK_CHECK(v->dim() == k.dim() && v->sym_sizes().slice(0, L) == lead, "v [..., hv, dv] with q/k's token dims ",
                 c10::SymIntArrayRef(lead), ", got v ", shape_str(*v), ". Fix: one value row per token, as k");
        check_cache(*vc, *v, hnd, "v_cache", "v");
        RK_CHECK(vc->sym_size(0) == kc.sym_size(0) && vc->sym_size(hnd ? 2 : 1) == kc.sym_size(hnd ? 2 : 1),
                 "v_cache with k_cache's blocks and block size, got k_cache ", shape_str(kc), " and v_cache ", shape_str(*vc),
                 ". Fix: allocate both caches with one block table");
    }
    if (ko != nullptr) {
        RK_CHECK(ko->sym_sizes() == k.sym_sizes() && ko->scalar_type() == k.scalar_type() && ko->device() == k.device(),
                 "k_out of k's shape/dtype/device ", shape_str(k), " ", dt_str(k.scalar_type()), " on ", k.device(),
                 ", got ", shape_str(*ko), " ", dt_str(ko->scalar_type()), " on ", ko->device(),
                 ". Fix: allocate it with torch.empty_like(k)");
        check_writable(*ko, "k_out");
    }
    const int64_t lay = parse_layout(layout);
    check_writable(q, "q");
    // every written tensor against every input, and the written ones against each other
    std::vector<std::pair<const Tensor*, const char*>> written = {{&q, "q"}, {&kc, "k_cache"}};
    if (vc) written.emplace_back(vc, "v_cache");
    if (ko) written.emplace_back(ko, "k_out");
    std::vector<std::pair<const Tensor*, const char*>> inputs = {
        {&k, "k"}, {&ct, "cos_table"}, {&st, "sin_table"}, {&pos, "positions"}, {&slots, "slots"}};
    if (v) inputs.emplace_back(v, "v");
    for (size_t i = 0; i < written.size(); ++i) {
        for (const auto& [t, nm] : inputs) check_no_overlap(*written[i].first, written[i].second, *t, nm);
        for (size_t j = i + 1; j < written.size(); ++j)
            check_no_overlap(*written[i].first, written[i].second, *written[j].first, written[j].second);
    }
    return {lay, hnd, L};
}

// Slots in range, no slot twice (which write lands would depend on the thread order); positions
// in the table. p, sl: contiguous int64 [T].
void check_cache_values(const Tensor& p, const Tensor& sl, int64_t ntable, int64_t nslots) {
    if (!p.is_cpu()) return;
    check_positions_range(p, ntable);
    const int64_t T = sl.numel();
    const int64_t* s = sl.const_data_ptr<int64_t>();
    std::vector<int64_t> used;
    used.reserve((size_t)T);
    for (int64_t t = 0; t < T; ++t) {
        RK_CHECK(s[t] < nslots, "slots below num_blocks * block_size = ", nslots, " (negative: not written), got slot ",
                 s[t], " for token ", t, ". Fix: allocate more blocks or fix the block table");
        if (s[t] >= 0) used.push_back(s[t]);
    }
    std::sort(used.begin(), used.end());
    for (size_t i = 1; i < used.size(); ++i)
        RK_CHECK(used[i] != used[i - 1], "slots that differ within one call (each token its own cache slot), got slot ",
                 used[i], " twice. Fix: give every written token its own slot (padding tokens: slot -1)");
}

// Element offset of every token (the leading L dims of x), in row-major token order.
std::vector<int64_t> token_offsets(const Tensor& x, int64_t L) {
    int64_t T = 1;
    for (int64_t i = 0; i < L; ++i) T *= x.size(i);
    std::vector<int64_t> off((size_t)T), idx((size_t)L, 0);
    int64_t o = 0;
    for (int64_t t = 0; t < T; ++t) {
        off[t] = o;
        for (int64_t i = L - 1; i >= 0; --i) {
            o += x.stride(i);
            if (++idx[i] < x.size(i)) break;
            o -= x.stride(i) * x.size(i);
            idx[i] = 0;
        }
    }
    return off;
}

// One token's h rows (x -> o, head strides xs/os) with one table row c/s (byte addresses).
void row_job(RkJob& j, int64_t dt, int64_t lay, int64_t half, int64_t d, intptr_t x, intptr_t o, int64_t xs,
             int64_t os, int64_t h, intptr_t c, intptr_t s) {
    std::memset(&j, 0, sizeof j);
    j.dtype = dt;
    j.layout = lay;
    j.half = half;
    j.d = d;
    j.x = x;
    j.o = o;
    j.c = c;
    j.s = s;
    j.nd = 1;
    j.nrows = h;
    j.size[0] = h;
    j.xs[0] = xs;
    j.os[0] = os;
}

intptr_t addr(const Tensor& t, int64_t elem_offset) {
    return reinterpret_cast<intptr_t>(t.data_ptr()) + elem_offset * (intptr_t)t.element_size();
}

void cache_into(const Tensor& q, const Tensor& k, const Tensor& ct, const Tensor& st, const Tensor& pos,
                const Tensor& kc, const Tensor& slots, const Tensor* v, const Tensor* vc, const Tensor* ko,
                const CacheCall& g) {
    const Tensor p = pos.to(at::kLong).contiguous().reshape({-1}), sl = slots.to(at::kLong).contiguous().reshape({-1});
    const int64_t nb = kc.size(0), bs = kc.size(g.hnd ? 2 : 1);
    check_cache_values(p, sl, ct.size(0), nb * bs);
    const int64_t T = p.numel(), L = g.lead, d = k.size(-1), half = ct.size(1);
    if (T == 0) return;
    TORCH_CHECK(supported_dtype(q) && supported_dtype(k), "ropekit: this build has no float16 kernel");
    // rows the kernel cannot address (a non-unit last stride) go through contiguous copies
    const Tensor qw = unit_last(q) ? q : q.contiguous(), kr = unit_last(k) ? k : k.contiguous();
    const bool ko_direct = ko != nullptr && unit_last(*ko);
    const Tensor kow = ko == nullptr ? Tensor() : ko_direct ? *ko : at::empty_like(kr);
    const int64_t dq = dtype_code(q.scalar_type()), dk = dtype_code(k.scalar_type());
    const Tensor cq = compute_tables(ct, dq).contiguous(), sq = compute_tables(st, dq).contiguous();
    const Tensor ck = compute_tables(ct, dk).contiguous(), sk = compute_tables(st, dk).contiguous();
    const int64_t cqs = half * (int64_t)cq.element_size(), cks = half * (int64_t)ck.element_size();
    const std::vector<int64_t> qoff = token_offsets(qw, L), koff = token_offsets(kr, L);
    const std::vector<int64_t> ooff = ko ? token_offsets(kow, L) : std::vector<int64_t>();
    const int64_t hq = q.size(-2), hk = k.size(-2);
    const int64_t ks0 = kc.stride(0), ks1 = kc.stride(g.hnd ? 2 : 1), ksh = kc.stride(g.hnd ? 1 : 2);
    const int64_t* P = p.const_data_ptr<int64_t>();
    const int64_t* S = sl.const_data_ptr<int64_t>();
    std::vector<RkJob> jobs;
    jobs.reserve((size_t)T * 3);
    const intptr_t cq0 = reinterpret_cast<intptr_t>(cq.data_ptr()), sq0 = reinterpret_cast<intptr_t>(sq.data_ptr());
    const intptr_t ck0 = reinterpret_cast<intptr_t>(ck.data_ptr()), sk0 = reinterpret_cast<intptr_t>(sk.data_ptr());
    for (int64_t t = 0; t < T; ++t) {
        RkJob j;
        if (hq > 0) {
            const intptr_t x = addr(qw, qoff[t]);
            row_job(j, dq, g.layout, half, d, x, x, qw.stride(-2), qw.stride(-2), hq, cq0 + P[t] * cqs, sq0 + P[t] * cqs);
            jobs.push_back(j);
        }
        if (hk == 0) continue;
        const intptr_t x = addr(kr, koff[t]), c = ck0 + P[t] * cks, s = sk0 + P[t] * cks;
        if (S[t] >= 0) {
            const int64_t blk = S[t] / bs, off = S[t] % bs;
            row_job(j, dk, g.layout, half, d, x, addr(kc, blk * ks0 + off * ks1), kr.stride(-2), ksh, hk, c, s);
            jobs.push_back(j);
        }
        if (ko != nullptr) {
            row_job(j, dk, g.layout, half, d, x, addr(kow, ooff[t]), kr.stride(-2), kow.stride(-2), hk, c, s);
            jobs.push_back(j);
        }
    }
    run_jobs(jobs.data(), (int64_t)jobs.size());
    if (!qw.is_same(q)) q.copy_(qw);
    if (ko != nullptr && !ko_direct) ko->copy_(kow);
    if (v == nullptr || v->size(-2) == 0 || v->size(-1) == 0) return;
    // values: copied row by row to their slots
    const Tensor vr = unit_last(*v) ? *v : v->contiguous();
    const std::vector<int64_t> voff = token_offsets(vr, L);
    const int64_t hv = vr.size(-2), dv = vr.size(-1), es = vr.element_size(), vsh = vr.stride(-2);
    const int64_t vs0 = vc->stride(0), vs1 = vc->stride(g.hnd ? 2 : 1), vch = vc->stride(g.hnd ? 1 : 2);
    const char* vb = static_cast<const char*>(vr.data_ptr());
    char* cb = static_cast<char*>(vc->data_ptr());
    auto copy_rows = [&](int64_t t0, int64_t t1) {
        for (int64_t t = t0; t < t1; ++t) {
            if (S[t] < 0) continue;
            const int64_t blk = S[t] / bs, off = S[t] % bs;
            const char* src = vb + voff[t] * es;
            char* dst = cb + (blk * vs0 + off * vs1) * es;
            if (vsh == dv && vch == dv) {
                std::memcpy(dst, src, (size_t)(hv * dv * es));
            } else {
                for (int64_t h = 0; h < hv; ++h) std::memcpy(dst + h * vch * es, src + h * vsh * es, (size_t)(dv * es));
            }
        }
    };
    const int64_t bytes = 2 * T * hv * dv * es;
    if (bytes < kParallelBytes || T == 1)
        copy_rows(0, T);
    else
        at::parallel_for(0, T, std::max<int64_t>(1, T * kGrainBytes / bytes), copy_rows);
}

void rotary_cache__cpu(Tensor& q, const Tensor& k, const Tensor& ct, const Tensor& st, const Tensor& pos, Tensor& kc,
                       const Tensor& slots, const c10::optional<Tensor>& v, const c10::optional<Tensor>& vc,
                       const c10::optional<Tensor>& ko, c10::string_view cache_layout, c10::string_view layout) {
    const CacheCall g =
        validate_cache(q, k, ct, st, pos, kc, slots, opt_ptr(v), opt_ptr(vc), opt_ptr(ko), cache_layout, layout);
    cache_into(q, k, ct, st, pos, kc, slots, opt_ptr(v), opt_ptr(vc), opt_ptr(ko), g);
}

using OptRef = const c10::optional<Tensor>&;
using CacheSig = void(Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&, Tensor&, const Tensor&, OptRef,
                      OptRef, OptRef, c10::string_view, c10::string_view);

void rotary_cache__adinplace(c10::DispatchKeySet ks, Tensor& q, const Tensor& k, const Tensor& ct, const Tensor& st,
                             const Tensor& pos, Tensor& kc, const Tensor& slots, OptRef v, OptRef vc, OptRef ko,
                             c10::string_view cl, c10::string_view l) {
    static auto op = RK_OP("rotary_cache_", CacheSig);
    op.redispatch(ks & c10::after_ADInplaceOrView_keyset, q, k, ct, st, pos, kc, slots, v, vc, ko, cl, l);
    torch::autograd::increment_version(q);
    torch::autograd::increment_version(kc);
    if (opt_ptr(vc)) torch::autograd::increment_version(*vc);
    if (opt_ptr(ko)) torch::autograd::increment_version(*ko);
}

// Not differentiable: a cache write is an inference step (the keys it stores are read later by
// attention kernels that autograd does not see). Refused rather than silently given no gradient.
void rotary_cache__autograd(c10::DispatchKeySet ks, Tensor& q, const Tensor& k, const Tensor& ct, const Tensor& st,
                            const Tensor& pos, Tensor& kc, const Tensor& slots, OptRef v, OptRef vc, OptRef ko,
                            c10::string_view cl, c10::string_view l) {
    const Tensor none;
    const Tensor *pv = opt_ptr(v), *pvc = opt_ptr(vc), *pko = opt_ptr(ko);
    RK_CHECK(!grad_on({&q, &k, &ct, &st, &kc, pv ? pv : &none, pvc ? pvc : &none, pko ? pko : &none}),
             "inputs of ropekit::rotary_cache_ that do not require grad (it writes a KV cache in place: an inference "
             "step whose stored keys autograd cannot follow into the attention kernels), got inputs that require grad",
             ". Fix: run it under torch.no_grad() / torch.inference_mode(), or use ropekit.apply_rotary_gather "
             "(differentiable) and write the cache yourself");
    static auto op = RK_OP("rotary_cache_", CacheSig);
    op.redispatch(ks & c10::after_autograd_keyset, q, k, ct, st, pos, kc, slots, v, vc, ko, cl, l);
}

// The validators for Python (the fake kernels in ropekit/ops.py and the kernels of other
// devices): a refusal is a ValueError with the same message as the CPU kernel's.
template <typename F>
void as_value_error(F&& f) {
    try {
        f();
    } catch (const c10::ValueError& e) {
        throw pybind11::value_error(e.what_without_backtrace());
    }
}

// RotaryEmbedding's step with [b] offsets (decode, chunked prefill) on CPU: the positions
// offsets[i] + 0..s-1 are range-checked against the table on the host, then rotary_gather(_)
// runs through the dispatcher like any call of it (autograd, version counters, profiler).
// Nothing is returned (None) when the call is one for the module's general path: a graph
// being traced, a dispatch or torch-function mode, a functorch transform, tables that
// require grad, another shape or kind of tensor, or a position the table does not cover
// (that path grows the table or words the refusal).
using OptPair = c10::optional<std::tuple<Tensor, Tensor>>;

OptPair module_gather(const Tensor& q, const Tensor& k, const Tensor& ct, const Tensor& st, const Tensor& off,
                      int64_t head_dim, const std::string& format, const std::string& layout, bool conj, bool inplace) {
    if (!q.defined() || !k.defined() || !ct.defined() || !st.defined() || !off.defined()) return c10::nullopt;
    for (const Tensor* t : {&q, &k, &ct, &st})  // dual tensors (forward-mode AD): the eager formula
        if (t->_fw_grad(/*level=*/0).defined()) return c10::nullopt;
    const auto tls = c10::impl::tls_local_dispatch_key_set();
    if (tls.included_.has(c10::DispatchKey::FuncTorchDynamicLayerFrontMode) ||
        tls.included_.has(c10::DispatchKey::Python) || tls.included_.has(c10::DispatchKey::PythonTLSSnapshot) ||
        c10::impl::dispatch_mode_enabled() || at::impl::torch_function_mode_enabled() ||
        torch::jit::tracer::isTracing())
        return c10::nullopt;
    if (format != "bshd" && format != "bhsd" && format != "sbhd") return c10::nullopt;
    const Format f = parse_format(format);
    if (q.dim() != 4 || k.dim() != 4 || !q.is_cpu() || !k.is_cpu() || !off.is_cpu() || !ct.is_cpu() ||
        off.scalar_type() != at::kLong || off.dim() != 1 || off.size(0) != q.size(f.b) || off.size(0) == 0 ||
        q.size(3) != head_dim || k.size(3) != head_dim || ct.dim() != 2 || ct.requires_grad() || st.requires_grad())
        return c10::nullopt;
    const int64_t s = q.size(f.s), rows = ct.size(0), st0 = off.stride(0);
    const int64_t* p = off.const_data_ptr<int64_t>();
    int64_t lo = p[0], hi = p[0];
    for (int64_t i = 1; i < off.size(0); ++i) lo = std::min(lo, p[i * st0]), hi = std::max(hi, p[i * st0]);
    if (lo < 0 || hi >= rows - s + 1 || s > rows) return c10::nullopt;
    const Tensor pos = s == 1 ? off : off.unsqueeze(1) + at::arange(s, off.options());
    try {
        pybind11::gil_scoped_release no_gil;
        if (inplace) {
            static auto op = RK_OP("rotary_gather_", GatherInSig);
            Tensor qi = q, ki = k;
            op.call(qi, ki, ct, st, pos, format, layout, conj);
            return std::make_tuple(q, k);
        }
        return call_gather(q, k, ct, st, pos, format, layout, conj);
    } catch (const c10::ValueError& e) {
        throw pybind11::value_error(e.what_without_backtrace());
    } catch (const c10::Error& e) {
        throw std::runtime_error(e.what_without_backtrace());
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
    m.def("qk_norm_rotary(Tensor q, Tensor k, Tensor q_weight, Tensor k_weight, Tensor cos, Tensor sin, float eps=1e-06, "
          "float weight_offset=0.0, str layout=\"half\") -> (Tensor, Tensor)");
    m.def("qk_norm_rotary_(Tensor(a!) q, Tensor(b!) k, Tensor q_weight, Tensor k_weight, Tensor cos, Tensor sin, "
          "float eps=1e-06, float weight_offset=0.0, str layout=\"half\") -> ()");
    m.def("qk_norm_rotary_fwd(Tensor q, Tensor k, Tensor q_weight, Tensor k_weight, Tensor cos, Tensor sin, float eps, "
          "float weight_offset, str layout) -> (Tensor, Tensor, Tensor, Tensor)");
    m.def("qk_norm_rotary_fwd_(Tensor(a!) q, Tensor(b!) k, Tensor q_weight, Tensor k_weight, Tensor cos, Tensor sin, "
          "float eps, float weight_offset, str layout) -> (Tensor, Tensor)");
    m.def("qk_norm_rotary_bwd(Tensor grad_q, Tensor grad_k, Tensor q, Tensor k, Tensor q_weight, Tensor k_weight, "
          "Tensor q_rstd, Tensor k_rstd, Tensor cos, Tensor sin, float weight_offset, str layout) "
          "-> (Tensor, Tensor, Tensor, Tensor)");
    m.def("rotary_cache_(Tensor(a!) q, Tensor k, Tensor cos_table, Tensor sin_table, Tensor positions, "
          "Tensor(b!) k_cache, Tensor slots, Tensor? v=None, Tensor(c!)? v_cache=None, Tensor(d!)? k_out=None, "
          "str cache_layout=\"nhd\", str layout=\"half\") -> ()");
    // ropekit.ops.refusal's trace-time probe: the validator runs in its fake kernel (Python); a
    // graph that kept the probe of an accepted call pays this empty kernel only
    m.def("refused(str op, Tensor?[] tensors, str[] strs, bool[] flags, float[] numbers) -> Tensor",
          torch::dispatch(c10::DispatchKey::CompositeExplicitAutograd, TORCH_FN(refused_probe)));
    m.def("cpu_capability() -> str", &cpu_capability);
    m.def("cos_sin(Tensor angles) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(ropekit, CPU, m) {
    m.impl("rotary", &rotary_cpu);
    m.impl("rotary_", &rotary__cpu);
    m.impl("rotary_out", &rotary_out_cpu);
    m.impl("rotary_qk", &rotary_qk_cpu);
    m.impl("rotary_qk_", &rotary_qk__cpu);
    m.impl("rotary_gather", &rotary_gather_cpu);
    m.impl("rotary_gather_", &rotary_gather__cpu);
    m.impl("qk_norm_rotary", &qk_norm_rotary_cpu);
    m.impl("qk_norm_rotary_", &qk_norm_rotary__cpu);
    m.impl("qk_norm_rotary_fwd", &qk_norm_rotary_fwd_cpu);
    m.impl("qk_norm_rotary_fwd_", &qk_norm_rotary_fwd__cpu);
    m.impl("qk_norm_rotary_bwd", &qk_norm_rotary_bwd_cpu);
    m.impl("rotary_cache_", &rotary_cache__cpu);
    m.impl("cos_sin", &cos_sin_cpu);
}

TORCH_LIBRARY_IMPL(ropekit, ADInplaceOrView, m) {
    m.impl("rotary_", torch::dispatch(c10::DispatchKey::ADInplaceOrView, TORCH_FN(rotary__adinplace)));
    m.impl("rotary_out", torch::dispatch(c10::DispatchKey::ADInplaceOrView, TORCH_FN(rotary_out_adinplace)));
    m.impl("rotary_qk_", torch::dispatch(c10::DispatchKey::ADInplaceOrView, TORCH_FN(rotary_qk__adinplace)));
    m.impl("rotary_gather_", torch::dispatch(c10::DispatchKey::ADInplaceOrView, TORCH_FN(rotary_gather__adinplace)));
    m.impl("qk_norm_rotary_", torch::dispatch(c10::DispatchKey::ADInplaceOrView, TORCH_FN(qk_norm_rotary__adinplace)));
    m.impl("qk_norm_rotary_fwd_",
           torch::dispatch(c10::DispatchKey::ADInplaceOrView, TORCH_FN(qk_norm_rotary_fwd__adinplace)));
    m.impl("rotary_cache_", torch::dispatch(c10::DispatchKey::ADInplaceOrView, TORCH_FN(rotary_cache__adinplace)));
}

TORCH_LIBRARY_IMPL(ropekit, Autograd, m) {
    m.impl("rotary", &rotary_autograd);
    m.impl("rotary_", torch::dispatch(c10::DispatchKey::Autograd, TORCH_FN(rotary__autograd)));
    m.impl("rotary_out", torch::dispatch(c10::DispatchKey::Autograd, TORCH_FN(rotary_out_autograd)));
    m.impl("rotary_qk", &rotary_qk_autograd);
    m.impl("rotary_qk_", torch::dispatch(c10::DispatchKey::Autograd, TORCH_FN(rotary_qk__autograd)));
    m.impl("rotary_gather", &rotary_gather_autograd);
    m.impl("rotary_gather_", torch::dispatch(c10::DispatchKey::Autograd, TORCH_FN(rotary_gather__autograd)));
    m.impl("qk_norm_rotary", &qk_norm_rotary_autograd);
    m.impl("qk_norm_rotary_", torch::dispatch(c10::DispatchKey::Autograd, TORCH_FN(qk_norm_rotary__autograd)));
    m.impl("qk_norm_rotary_fwd", &qk_norm_rotary_fwd_autograd);
    m.impl("qk_norm_rotary_fwd_", torch::dispatch(c10::DispatchKey::Autograd, TORCH_FN(qk_norm_rotary_fwd__autograd)));
    m.impl("qk_norm_rotary_bwd", &qk_norm_rotary_bwd_autograd);
    m.impl("rotary_cache_", torch::dispatch(c10::DispatchKey::Autograd, TORCH_FN(rotary_cache__autograd)));
    m.impl("cos_sin", &cos_sin_autograd);
}

// `import ropekit._C` loads this library (its static initialisers above register the ops)
// and gives Python the validators, one per op (check_* below; ropekit.ops.check calls them).
PYBIND11_MODULE(_C, m) {
    using OptT = c10::optional<Tensor>;
    m.def("module_gather", &module_gather);
    m.def("check_rotary", [](const Tensor& x, const Tensor& c, const Tensor& s, std::string layout, bool inplace,
                             const OptT& out) {
        as_value_error([&] { validate_rotary(x, c, s, layout, inplace, out.has_value() ? &*out : nullptr); });
    });
    m.def("check_qk", [](const Tensor& q, const Tensor& k, const Tensor& c, const Tensor& s, std::string layout,
                         bool inplace) { as_value_error([&] { validate_qk(q, k, c, s, layout, inplace); }); });
    m.def("check_gather", [](const Tensor& q, const Tensor& k, const Tensor& ct, const Tensor& st, const Tensor& pos,
                             std::string format, std::string layout, bool inplace) {
        as_value_error([&] { validate_gather(q, k, ct, st, pos, format, layout, inplace); });
    });
    m.def("check_qk_norm", [](const Tensor& q, const Tensor& k, const Tensor& qw, const Tensor& kw, const Tensor& c,
                              const Tensor& s, double eps, double off, std::string layout, bool inplace) {
        as_value_error([&] { validate_qk_norm(q, k, qw, kw, c, s, eps, off, layout, inplace); });
    });
    m.def("check_qk_norm_bwd", [](const Tensor& gq, const Tensor& gk, const Tensor& q, const Tensor& k, const Tensor& qw,
                                  const Tensor& kw, const Tensor& rq, const Tensor& rk, const Tensor& c, const Tensor& s,
                                  double off, std::string layout) {
        as_value_error([&] { validate_qk_norm_bwd(gq, gk, q, k, qw, kw, rq, rk, c, s, off, layout); });
    });
    m.def("check_cos_sin", [](const Tensor& angles) { as_value_error([&] { validate_cos_sin(angles); }); });
    m.def("check_rotary_cache", [](const Tensor& q, const Tensor& k, const Tensor& ct, const Tensor& st,
                                   const Tensor& pos, const Tensor& kc, const Tensor& slots, const OptT& v,
                                   const OptT& vc, const OptT& ko, std::string cache_layout, std::string layout) {
        as_value_error([&] {
            validate_cache(q, k, ct, st, pos, kc, slots, opt_ptr(v), opt_ptr(vc), opt_ptr(ko), cache_layout, layout);
        });
    });
}
