"""Bad input -> RopeError saying what was expected, what was received, how to fix it."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

import ropekit
from ropekit import RopeConfig, RopeError, apply_rotary, apply_rotary_qk, cos_sin, from_full_width


def test_ropeerror_is_valueerror():
    assert issubclass(RopeError, ValueError)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(head_dim=64, rotary_dim=33), r"rotary_dim even and in \[2, head_dim=64\].*rotary_dim=33"),
        (dict(head_dim=64, rotary_dim=128), r"rotary_dim=128"),
        (dict(head_dim=64, rotary_dim=0), r"rotary_dim=0"),
        (dict(head_dim=0), r"head_dim an int in \[1, 65536\], got 0"),
        (dict(head_dim=64.5), r"head_dim an int.*64\.5"),
        (dict(head_dim="64"), r"head_dim an int.*the string '64'.*not a string"),
        (dict(head_dim=10**12), r"head_dim an int in \[1, 65536\]"),
        (dict(head_dim=True), r"head_dim an int in \[1, 65536\], got True"),
        (dict(head_dim=torch.tensor(True)), r"head_dim an int in \[1, 65536\], got tensor\(True\)"),  # was read as 1
        (dict(head_dim=64, base="1e6"), r"base a finite number > 1, got the string '1e6'"),
        (dict(head_dim=64, base=10**400), r"base a finite number > 1"),
        (dict(head_dim=64, base=-1.0), r"base a finite number > 1"),
        (dict(head_dim=64, base=float("inf")), r"base a finite number > 1"),
        (dict(head_dim=64, layout="neox"), r"layout in \('half', 'interleaved'\).*'neox'"),
        (dict(head_dim=64, scaling={"type": "linear"}), r"scaling a ropekit.scaling scheme"),
    ],
)
def test_config_errors(kwargs, match):
    with pytest.raises(RopeError, match=match) as e:
        RopeConfig(**kwargs)
    assert "Fix:" in str(e.value)


def _xcs(d=16, r=16, s=4):
    cos, sin = cos_sin(RopeConfig(d, rotary_dim=r), torch.arange(s))
    return torch.randn(2, s, 3, d), cos[:, None], sin[:, None]


def test_apply_errors():
    x, c, s = _xcs()
    with pytest.raises(RopeError, match=r"real floating dtype.*torch.int64"):
        apply_rotary(x.long(), c, s)
    with pytest.raises(RopeError, match=r"complex64.*view_as_real"):
        apply_rotary(torch.randn(2, 4, 3, 16, dtype=torch.complex64), c, s)
    with pytest.raises(RopeError, match=r"layout in"):
        apply_rotary(x, c, s, layout="gptj")
    with pytest.raises(RopeError, match=r"backend in \['auto'"):
        apply_rotary(x, c, s, backend="cuda")
    with pytest.raises(RopeError, match=r"full-width tables .*from_full_width"):
        fc, fs = ropekit.to_full_width(c), ropekit.to_full_width(s)
        apply_rotary(x, fc, fs)
    with pytest.raises(RopeError, match=r"width 12 for x of head dim 16"):
        apply_rotary(x, torch.zeros(4, 1, 12), torch.zeros(4, 1, 12))
    with pytest.raises(RopeError, match=r"broadcastable to x.shape\[:-1\] \+ \(r/2,\) = \(2, 4, 3, 8\).*\(5, 1, 8\)"):
        c5, s5 = cos_sin(RopeConfig(16), torch.arange(5))
        apply_rotary(x, c5[:, None], s5[:, None])
    with pytest.raises(RopeError, match=r"broadcastable"):  # would enlarge x: never a silent broadcast
        apply_rotary(x[:1], c.expand(4, 3, 8)[None].expand(2, 4, 3, 8), s.expand(4, 3, 8)[None].expand(2, 4, 3, 8))
    with pytest.raises(RopeError, match=r"same shape"):
        apply_rotary(x, c, s[:, :, :4])
    with pytest.raises(RopeError, match=r"either inplace=True or out="):
        apply_rotary(x, c, s, inplace=True, out=torch.empty_like(x))
    with pytest.raises(RopeError, match=r"out of x's shape"):
        apply_rotary(x, c, s, out=torch.empty(3))
    with pytest.raises(RopeError, match=r"overlapping memory"):
        apply_rotary(torch.randn(1, 1, 1, 16).expand(2, 4, 3, 16), c, s, inplace=True)
    with pytest.raises(RopeError, match=r"leaf tensor that requires grad"):
        apply_rotary(x.clone().requires_grad_(), c, s, inplace=True)
    with pytest.raises(RopeError, match=r"out= without autograd"):
        apply_rotary(x.clone().requires_grad_(), c, s, out=torch.empty_like(x))
    with pytest.raises(RopeError, match=r"cos of a real floating dtype"):
        apply_rotary(x, c.long(), s.long())
    with pytest.raises(RopeError, match=r"got width 8 for k of head dim 8"):
        apply_rotary_qk(x, x[..., :8], c, s)


def test_input_never_modified_on_error():
    x, c, s = _xcs()
    keep = x.clone()
    with pytest.raises(RopeError):
        apply_rotary(x, c[:3], s[:3], inplace=True)
    assert torch.equal(x, keep)


def test_table_errors():
    cfg = RopeConfig(16)
    with pytest.raises(RopeError, match=r"integer dtype.*float32"):
        cos_sin(cfg, torch.arange(4.0))
    with pytest.raises(RopeError, match=r">= 0.*-3"):
        cos_sin(cfg, torch.tensor([0, -3]))
    with pytest.raises(RopeError, match=r"dtype one of"):
        cos_sin(cfg, torch.arange(4), dtype=torch.int32)
    with pytest.raises(RopeError, match=r'is it "interleaved"'):
        c, _ = cos_sin(cfg, torch.arange(4))
        from_full_width(ropekit.to_full_width(c, "interleaved"), "half")


def test_import_is_light():
    code = (
        "import sys, ropekit\n"
        "bad = [m for m in ('triton', 'transformers', 'matplotlib', 'numpy.typing') if m in sys.modules and m != 'numpy.typing']\n"
        "print(','.join(bad))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", f"import ropekit loaded {out.stdout.strip()}"
