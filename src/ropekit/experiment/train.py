"""Seeded, deterministic training and evaluation of :class:`~ropekit.experiment.model.TinyLM`.

Losses are reported in bits per byte (cross-entropy in nats / ln 2).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F

from .._errors import fail
from .model import TinyLM

__all__ = ["TrainConfig", "train", "EvalWindows", "eval_windows", "evaluate", "set_determinism"]

LN2 = math.log(2.0)


def set_determinism(threads: int = 2) -> None:
    """At most ``threads`` intra-op threads (capped at 2) and deterministic algorithms."""
    torch.set_num_threads(max(1, min(2, int(threads))))
    torch.use_deterministic_algorithms(True)


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Optimisation settings (AdamW, linear warm-up then cosine decay to ``lr * min_lr_ratio``).

    Args:
        steps: optimizer steps (the fixed budget, equal for every position encoding).
        batch: sequences per step; each has ``seq_len`` inputs and ``seq_len`` targets.
        seq_len: training length (defaults to the model's ``ctx`` when 0).
        lr, weight_decay, warmup, min_lr_ratio, grad_clip: the usual.
        eval_every: steps between held-out evaluations for the loss curve.
        eval_batches: held-out windows of ``seq_len`` used for those evaluations.
    """

    steps: int = 600
    batch: int = 32
    seq_len: int = 0
    lr: float = 3e-3
    weight_decay: float = 0.1
    warmup: int = 30
    min_lr_ratio: float = 0.1
    grad_clip: float = 1.0
    eval_every: int = 50
    eval_batches: int = 32

    def lr_at(self, step: int) -> float:
        if step < self.warmup:
            return self.lr * (step + 1) / self.warmup
        t = (step - self.warmup) / max(1, self.steps - self.warmup)
        return self.lr * (self.min_lr_ratio + (1 - self.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, t))))


def _batch(data: torch.Tensor, starts: torch.Tensor, n: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Inputs and targets ``[b, n]`` (int64) from byte windows starting at ``starts [b]``."""
    idx = starts[:, None] + torch.arange(n + 1)  # [b, n+1]
    w = data[idx].long()  # [b, n+1]
    return w[:, :-1], w[:, 1:]


def bits_per_byte(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-position cross-entropy in bits, ``[b, s]`` from logits ``[b, s, 256]``, targets ``[b, s]``."""
    ce = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), reduction="none")  # [b*s]
    return ce.view(targets.shape) / LN2


def train(
    model: TinyLM,
    data: torch.Tensor,
    heldout: torch.Tensor,
    tc: TrainConfig,
    *,
    seed: int,
    progress: Optional[Callable[[int, float], None]] = None,
) -> Dict[str, List[float]]:
    """Train ``model`` in place on random windows of ``data`` (uint8 ``[n]``).

    The window order depends only on ``seed`` (not on the model), so every position
    encoding sees the same bytes in the same order. Returns the loss curve:
    ``{"step": [...], "train_bpb": [...], "val_bpb": [...]}``, the train value being the
    mean over the steps since the previous point.
    """
    n = tc.seq_len or model.mc.ctx
    if data.numel() < n + 2:
        raise fail(f"a training stream longer than seq_len + 1 = {n + 1}", f"{data.numel()} bytes", "use a larger corpus")
    gen = torch.Generator().manual_seed(10_000 + seed)
    # fixed held-out windows for the curve: evenly spaced over the held-out stream
    val_starts = torch.linspace(0, heldout.numel() - n - 2, tc.eval_batches).long()
    vx, vy = _batch(heldout, val_starts, n)
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": tc.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=tc.lr,
        betas=(0.9, 0.95),
        foreach=False,
    )
    curve: Dict[str, List[float]] = {"step": [], "train_bpb": [], "val_bpb": []}
    acc, cnt = 0.0, 0

    def _val() -> float:
        model.eval()
        with torch.no_grad():
            v = float(bits_per_byte(model(vx), vy).mean())
        model.train()
        return v

    model.train()
    for step in range(tc.steps):
        for g in opt.param_groups:
            g["lr"] = tc.lr_at(step)
        starts = torch.randint(0, data.numel() - n - 1, (tc.batch,), generator=gen)
        x, y = _batch(data, starts, n)
        loss = bits_per_byte(model(x), y).mean()
        opt.zero_grad(set_to_none=True)
        (loss * LN2).backward()  # optimise nats; report bits
        if tc.grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip)
        opt.step()
        acc, cnt = acc + loss.item(), cnt + 1
        last = step == tc.steps - 1
        if (step + 1) % tc.eval_every == 0 or last:
            curve["step"].append(step + 1)
            curve["train_bpb"].append(acc / cnt)
            curve["val_bpb"].append(_val())
            acc, cnt = 0.0, 0
        if progress is not None:
            progress(step + 1, loss.item())
    model.eval()
    return curve


@dataclasses.dataclass(frozen=True)
class EvalWindows:
    """Held-out evaluation spans: ``n`` spans of ``span`` bytes (+1 target byte), evenly
    spaced over the held-out stream. ``tokens`` is uint8 ``[n, span + 1]``."""

    tokens: torch.Tensor

    @property
    def span(self) -> int:
        return self.tokens.shape[1] - 1


def eval_windows(heldout: torch.Tensor, n: int, span: int) -> EvalWindows:
    """``n`` spans of ``span + 1`` bytes, evenly spaced over ``heldout`` (deterministic)."""
    if heldout.numel() < span + 2:
        raise fail(f"a held-out stream longer than {span + 1} bytes", f"{heldout.numel()}", "use fewer/shorter spans")
    starts = torch.linspace(0, heldout.numel() - span - 2, n).long()  # [n]
    idx = starts[:, None] + torch.arange(span + 1)  # [n, span+1]
    return EvalWindows(heldout[idx])


@torch.no_grad()
def evaluate(
    model: TinyLM,
    ev: EvalWindows,
    length: int,
    *,
    tail: int = 128,
    batch_tokens: int = 16384,
) -> Tuple[float, float]:
    """Bits per byte at window length ``length`` on the same held-out bytes at every length.

    Each span of ``ev`` is cut into ``span / length`` consecutive windows of ``length``
    bytes, each an independent sequence with positions ``0 .. length-1`` (and
    ``seq_len=length`` for length-dependent scaling).

    Returns:
        ``(all_bpb, tail_bpb)``: the mean over every position of every window (the whole
        spans, so the same bytes at every length), and the mean over the last ``tail``
        positions of each span's last window — the same ``tail`` bytes at every length,
        predicted with ``length - tail`` bytes of context before them.
    """
    span = ev.span
    if length <= 0 or span % length:
        raise fail(f"a window length dividing the span {span}", repr(length), "use powers of two up to the span")
    if tail > length:
        raise fail(f"tail <= length {length}", repr(tail), "lower tail")
    n = ev.tokens.shape[0]
    k = span // length
    toks = ev.tokens.long()
    x = toks[:, :-1].reshape(n * k, length)  # [n*k, length]
    y = toks[:, 1:].reshape(n * k, length)  # [n*k, length]
    per = max(1, batch_tokens // length)
    bits = torch.cat([bits_per_byte(model(x[i : i + per], seq_len=length), y[i : i + per]) for i in range(0, n * k, per)])
    bits = bits.view(n, k, length)  # [n, k, length]
    return float(bits.mean()), float(bits[:, -1, -tail:].mean())
