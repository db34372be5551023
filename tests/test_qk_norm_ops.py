"""The fused norm + rotation operators (``torch.ops.ropekit.qk_norm_rotary*``) as PyTorch sees
them: what the forward saves, version counters, graphs holding the op forward and backward,
refusals in C++ as RopeErrors, and the paths of the kernel (the buffer-free one for
``d % 16 == 0``, the buffered one, the contiguous copies for other strides) against a float64
oracle written here.

Bits across calls, processes and instruction-set levels: tests/test_operators.py (its probe
includes this op). Every backend against the oracle: tests/test_qk_norm.py.
"""

from __future__ import annotations

import pytest
import torch

import ropekit
from ropekit import RopeConfig, RopeError, apply_qk_norm_rotary, cos_sin, ops

pytestmark = pytest.mark.skipif(not ops.LOADED, reason=f"operators not built: {ops.REASON}")
OPS = torch.ops.ropekit if ops.LOADED else None


def _oracle(x, w, cos, sin, eps, offset, layout):
    """float64: x / sqrt(mean(x²) + eps) · (offset + w), then the pairs of the first r dims rotated."""
    x, w, c, s = x.double(), w.double(), cos.double(), sin.double()
    y = x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps) * (offset + w)
    h = cos.shape[-1]
    out = y.clone()
    i1 = torch.arange(h) if layout == "half" else 2 * torch.arange(h)
    i2 = i1 + h if layout == "half" else i1 + 1
    a, b = y[..., i1], y[..., i2]
    out[..., i1] = a * c - b * s
    out[..., i2] = b * c + a * s
    return out


def _setup(d=128, r=None, s=6, hq=4, hk=2, dt=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(2, s, hq, d, generator=g).to(dt)
    k = torch.randn(2, s, hk, d, generator=g).to(dt)
    wq, wk = torch.randn(d, generator=g), torch.randn(d, generator=g)
    c, sn = cos_sin(RopeConfig(d, rotary_dim=r or d), torch.arange(s))
    return q, k, wq, wk, c[:, None], sn[:, None]


@pytest.mark.parametrize("d,r", [(128, 128), (128, 64), (256, 32), (64, 64), (80, 40), (96, 96), (130, 128), (18, 16)])
@pytest.mark.parametrize("layout", ["half", "interleaved"])
def test_every_kernel_path_against_the_float64_oracle(d, r, layout):
    """(128, 128), (128, 64), (256, 32), (64, 64): the buffer-free path; the others the buffered one."""
    q, k, wq, wk, c, s = _setup(d, r)
    qo, ko = OPS.qk_norm_rotary(q, k, wq, wk, c, s, 1e-6, 0.25, layout)
    for x, w, o in ((q, wq, qo), (k, wk, ko)):
        want = _oracle(x, w, c, s, 1e-6, 0.25, layout)
        # float32: a few roundings of values of magnitude |w|·|x̂| ≲ 10
        torch.testing.assert_close(o.double(), want, rtol=0, atol=4e-6 * float(want.abs().max()))


def test_strided_inputs_take_the_same_bits_as_contiguous_ones():
    """Non-unit last stride (copied), a bshd view of bhsd memory, a sliced qkv buffer: same bits."""
    q, k, wq, wk, c, s = _setup(128, 128, s=5)
    want = OPS.qk_norm_rotary(q, k, wq, wk, c, s, 1e-6, 0.0, "half")
    qt = q.transpose(-1, -2).contiguous().transpose(-1, -2)          # last-dim stride 5*... != 1
    kb = k.transpose(1, 2).contiguous().transpose(1, 2)              # bshd view of bhsd
    qkv = torch.cat([q, k, k], dim=2)                                # [b, s, hq + 2hk, d]
    for qq, kk in ((qt, kb), (qkv[:, :, :4], qkv[:, :, 4:6])):
        got = OPS.qk_norm_rotary(qq, kk, wq, wk, c, s, 1e-6, 0.0, "half")
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def test_forward_saves_the_inverse_rms_per_row():
    q, k, wq, wk, c, s = _setup(80, 40)
    _, _, rq, rk = OPS.qk_norm_rotary_fwd(q, k, wq, wk, c, s, 1e-5, 0.0, "half")
    assert rq.shape == q.shape[:-1] and rk.shape == k.shape[:-1] and rq.dtype == torch.float32
    want = 1 / torch.sqrt(q.double().pow(2).mean(-1) + 1e-5)
    torch.testing.assert_close(rq.double(), want, rtol=2e-7, atol=0)


def test_in_place_bumps_versions_and_a_modified_saved_input_is_caught():
    q, k, wq, wk, c, s = _setup()
    v = (q._version, k._version)
    OPS.qk_norm_rotary_(q, k, wq, wk, c, s, 1e-6, 0.0, "half")
    assert q._version > v[0] and k._version > v[1]
    q, k, wq, wk, c, s = _setup()
    q.requires_grad_()
    x = q * 1
    qo, ko = apply_qk_norm_rotary(x, k, wq, wk, c, s)
    x.add_(1)  # the forward saved x
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        qo.sum().backward()


def test_gradients_of_in_place_and_out_of_place_agree_bit_for_bit():
    q, k, wq, wk, c, s = _setup(128, 64)
    res = []
    for inplace in (False, True):
        leaves = [t.clone().requires_grad_() for t in (q, k, wq, wk)]
        qq, kk = leaves[0] * 1, leaves[1] * 1
        qo, ko = apply_qk_norm_rotary(qq, kk, leaves[2], leaves[3], c, s, inplace=inplace)
        ((qo * qo).sum() + ko.sum()).backward()
        res.append([qo.detach(), ko.detach()] + [t.grad for t in leaves])
    for a, b in zip(*res):
        assert torch.equal(a, b)


def test_errors_raised_in_cpp_are_rope_errors():
    q, k, wq, wk, c, s = _setup()
    bad = [
        dict(q_weight=torch.ones(4 * 128)),            # a norm over all heads
        dict(k_weight=torch.ones(2, 128)),
        dict(q_weight=torch.ones(128, dtype=torch.int64)),
        dict(eps=-1.0),
        dict(eps=float("nan")),
        dict(weight_offset=float("inf")),
        dict(cos=torch.ones(6, 1, 65), sin=torch.ones(6, 1, 65)),  # wider than d/2
    ]
    for kw in bad:
        args = dict(q=q, k=k, q_weight=wq, k_weight=wk, cos=c, sin=s)
        args.update({a: b for a, b in kw.items() if a in args})
        opts = {a: b for a, b in kw.items() if a not in args}
        with pytest.raises(RopeError):
            apply_qk_norm_rotary(args["q"], args["k"], args["q_weight"], args["k_weight"], args["cos"], args["sin"],
                                 backend="cpu", **opts)
    qkv = torch.randn(2, 6, 6, 128)
    with pytest.raises(RopeError, match="share no memory"):
        apply_qk_norm_rotary(qkv[:, :, :4], qkv[:, :, 3:5], wq, wk, c, s, inplace=True, backend="cpu")


def test_learnable_tables_take_the_composition_and_get_gradients():
    q, k, wq, wk, c, s = _setup(64, 32)
    c, s = c.clone().requires_grad_(), s.clone().requires_grad_()
    qo, ko = apply_qk_norm_rotary(q, k, wq, wk, c, s, backend="cpu")
    (qo.sum() + ko.sum()).backward()
    assert c.grad is not None and s.grad is not None and c.grad.abs().sum() > 0


def _recording(graphs):
    from torch._dynamo.backends.common import aot_autograd

    def record(gm, _):
        graphs.append(gm)
        return gm

    return aot_autograd(fw_compiler=record, bw_compiler=record)


def test_compile_fullgraph_holds_the_forward_and_backward_ops():
    torch._dynamo.reset()
    q, k, wq, wk, c, s = _setup(64, 48, s=4)

    def fn(q, k, wq, wk):
        return apply_qk_norm_rotary(q, k, wq, wk, c, s, weight_offset=1.0)

    graphs = []
    compiled = torch.compile(fn, fullgraph=True, backend=_recording(graphs))
    res = []
    for f in (fn, compiled):
        leaves = [t.clone().requires_grad_() for t in (q, k, wq, wk)]
        qo, ko = f(*leaves)
        ((qo * 3).sum() + (ko * ko).sum()).backward()
        res.append([qo.detach(), ko.detach()] + [t.grad for t in leaves])
    for a, b in zip(*res):
        torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-6)
    text = [str(gm.graph) for gm in graphs]
    assert len(graphs) == 2 and "qk_norm_rotary_fwd" in text[0] and "qk_norm_rotary_bwd" in text[1], text


def test_export_and_jit_trace_hold_the_op():
    q, k, wq, wk, c, s = _setup(64, 64, s=4)

    class M(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.wq, self.wk = torch.nn.Parameter(wq), torch.nn.Parameter(wk)

        def forward(self, q, k):
            return apply_qk_norm_rotary(q, k, self.wq, self.wk, c, s, eps=1e-5)

    m = M()
    with torch.no_grad():
        want = m(q, k)
        ep = torch.export.export(m, (q, k))
        assert "ropekit.qk_norm_rotary" in str(ep.graph)
        tr = torch.jit.trace(m, (q, k))
        for got in (ep.module()(q, k), tr(q, k)):
            assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def test_empty_inputs():
    q, k, wq, wk, c, s = _setup()
    qo, ko = apply_qk_norm_rotary(q, k[:, :, :0], wq, wk, c, s)
    assert ko.shape == (2, 6, 0, 128) and torch.equal(qo, OPS.qk_norm_rotary(q, k, wq, wk, c, s, 1e-6, 0.0, "half")[0])
    qq = q[:, :0].clone().requires_grad_()
    qo, ko = apply_qk_norm_rotary(qq, k[:, :0], wq.requires_grad_(), wk, c[:0], s[:0])
    qo.sum().backward()
    assert qq.grad.shape == qq.shape and torch.equal(wq.grad, torch.zeros(128))


_CANON = {torch.float32: (torch.int32, 0x7FC00000), torch.float64: (torch.int64, 0x7FF8000000000000),
          torch.bfloat16: (torch.int16, 0x7FC0), torch.float16: (torch.int16, 0x7E00)}


@pytest.mark.parametrize("wdt", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
def test_weight_gradient_nans_are_canonical(wdt):
    # docs/numerics.md: every NaN an operator computes is the canonical quiet NaN. Two sources
    # in the weight gradient's final reduction (host code): +inf and -inf partial sums of two
    # 64-row blocks meet in the double sum (x86's default NaN is negative), and the narrowing of
    # that sum to a 16-bit weight dtype (torch's vectorised cast stored 0xFFFF for bfloat16).
    # d = 64: wide enough for the cast's vector lanes.
    d, rows = 64, 65
    q = torch.ones(1, rows, 1, d, requires_grad=True)
    k = torch.ones(1, rows, 1, d, requires_grad=True)
    wq = torch.ones(d, dtype=wdt, requires_grad=True)
    wk = torch.ones(d, dtype=wdt, requires_grad=True)
    cos, sin = torch.ones(rows, 1, d // 2), torch.zeros(rows, 1, d // 2)
    qo, ko = torch.ops.ropekit.qk_norm_rotary(q, k, wq, wk, cos, sin, 1e-6, 0.0, "half")
    gq = torch.zeros_like(qo)
    # first half of the dims (sin = 0: the second half's u = 0·c - inf·0 is a NaN from the
    # kernel): block 0's partial +inf, block 1's -inf; a NaN gradient in row 1, dim 0
    gq[0, 0, 0, : d // 2] = float("inf")
    gq[0, 64, 0, : d // 2] = float("-inf")
    gq[0, 1, 0, 0] = float("nan")
    torch.autograd.backward([qo, ko], [gq, torch.zeros_like(ko)])
    it, canon = _CANON[wdt]
    g = wq.grad
    assert torch.isnan(g).all()
    bits = g.view(it).tolist()
    mask = (1 << (8 * g.element_size())) - 1
    assert {b & mask for b in bits} == {canon}
