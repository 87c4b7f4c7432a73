"""The ``curvature compare`` command: the schedule-comparison harness (:mod:`curvature.warmup.compare`) on two
bundled setups — :func:`digits_setup` (a tanh FCN on scikit-learn's digits with SGD) and :func:`byte_lm_setup` (a
one-block byte-level Transformer LM on the bytes of Python's standard-library sources with Adam), which also feed
``notebooks/schedule_comparison.ipynb``. The harness's names are re-exported here.
"""
from __future__ import annotations

import argparse
import math
import os
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import nn

from .warmup.compare import (DEFAULT_SCHEDULES, SUMMARY_KEYS, ComparisonResult, compare_schedules,
                             find_required_warmup, lm_loss)

__all__ = ["compare_schedules", "ComparisonResult", "DEFAULT_SCHEDULES", "SUMMARY_KEYS", "find_required_warmup",
           "digits_setup", "byte_lm_setup", "digits_fcn", "ByteLM", "stdlib_bytes", "lm_loss", "run_setup",
           "add_compare_subcommand", "run_compare", "SETUPS"]


# ---------------------------------------------------------------------------------------------------
# Bundled setups
# ---------------------------------------------------------------------------------------------------
def digits_fcn(seed: int = 0, hidden: int = 32, init_scale: float = 2.0) -> nn.Module:
    """The demo's tanh FCN ``64 → hidden → hidden → 10`` (:func:`curvature.demo.digits_model`) with its weight
    matrices multiplied by ``init_scale`` (default 2: a large initialisation, in the sharpness-reduction phase
    of Kalra & Barkeshli, where warm-up decides which target rates train)."""
    from .demo import digits_model

    model = digits_model(hidden=hidden, seed=seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 2:
                p.mul_(init_scale)
    return model


def digits_setup(quick: bool = False) -> dict:
    """The digits FCN with full-batch SGD on the mean squared error to one-hot targets (scikit-learn's bundled
    digits: no download). ``λ_0 ≈ 2.5``: ``η_trgt = 6`` is 7.5× the stability threshold at initialisation."""
    from .demo import digits_data, digits_loss

    return dict(make_model=digits_fcn, data=digits_data("train"), eval_data=digits_data("test"),
                loss_fn=digits_loss, optimizer="sgd", lr_target=6.0, steps=60 if quick else 200,
                batch_size=None, track_every=5 if quick else 10, warmup_steps=20,
                curvature_aware={"kind": "curvature_aware", "safety": 1.8, "every": 5},
                description="digits tanh FCN (init ×2), full-batch SGD, MSE")


def stdlib_bytes(num_bytes: int = 1 << 16, files: Sequence[str] = ("functools.py", "textwrap.py", "string.py",
                                                                       "bisect.py", "heapq.py", "fnmatch.py",
                                                                       "shlex.py", "argparse.py")) -> bytes:
    """The first ``num_bytes`` of the concatenated sources of a few standard-library modules (found next to
    the ``os`` module; missing files are skipped)."""
    root = Path(os.__file__).parent
    chunks = []
    for name in files:
        p = root / name
        if p.exists():
            chunks.append(p.read_bytes())
    text = b"\n".join(chunks)
    if not text:
        raise FileNotFoundError(f"no standard-library sources found under {root}")
    return text[:num_bytes]


def byte_lm_data(seq_len: int = 32, num_bytes: int = 1 << 16) -> tuple[torch.Tensor, torch.Tensor]:
    """Non-overlapping windows of the stdlib bytes: inputs ``(N, seq_len)`` and next-byte targets ``(N, seq_len)``."""
    data = torch.tensor(list(stdlib_bytes(num_bytes)), dtype=torch.long)
    n = (len(data) - 1) // seq_len
    X = data[: n * seq_len].view(n, seq_len)
    Y = data[1: n * seq_len + 1].view(n, seq_len)
    return X, Y


class ByteLM(nn.Module):
    """A tiny pre-LN decoder-only Transformer over bytes (vocabulary 256): embedding + learned positions,
    ``layers`` blocks of causal self-attention (written out, so it is twice differentiable) and a GELU MLP, a
    final LayerNorm and a head tied to the embedding."""

    def __init__(self, d: int = 32, heads: int = 2, layers: int = 1, seq_len: int = 32, vocab: int = 256) -> None:
        super().__init__()
        self.heads = heads
        self.emb = nn.Embedding(vocab, d)
        self.pos = nn.Parameter(torch.randn(seq_len, d) * 0.02)
        self.blocks = nn.ModuleList()
        for _ in range(layers):
            self.blocks.append(nn.ModuleDict(dict(ln1=nn.LayerNorm(d), qkv=nn.Linear(d, 3 * d),
                                                  proj=nn.Linear(d, d), ln2=nn.LayerNorm(d),
                                                  mlp=nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(),
                                                                    nn.Linear(4 * d, d)))))
        self.lnf = nn.LayerNorm(d)
        self.register_buffer("mask", torch.tril(torch.ones(seq_len, seq_len, dtype=torch.bool)), persistent=False)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        B, T = idx.shape
        x = self.emb(idx) + self.pos[:T]
        for blk in self.blocks:
            q, k, v = blk["qkv"](blk["ln1"](x)).split(x.shape[-1], dim=-1)
            q, k, v = (z.view(B, T, self.heads, -1).transpose(1, 2) for z in (q, k, v))
            att = (q @ k.transpose(-2, -1)) / math.sqrt(q.shape[-1])
            att = att.masked_fill(~self.mask[:T, :T], float("-inf")).softmax(-1)
            x = x + blk["proj"]((att @ v).transpose(1, 2).reshape(B, T, -1))
            x = x + blk["mlp"](blk["ln2"](x))
        return self.lnf(x) @ self.emb.weight.T


def byte_lm(seed: int = 0, d: int = 32, heads: int = 2, layers: int = 1, seq_len: int = 32) -> ByteLM:
    """A :class:`ByteLM` built with ``torch.manual_seed(seed)`` (the global RNG state is restored)."""
    state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        return ByteLM(d=d, heads=heads, layers=layers, seq_len=seq_len)
    finally:
        torch.random.set_rng_state(state)


def byte_lm_setup(quick: bool = False) -> dict:
    """The byte-level Transformer LM with Adam on mini-batches of stdlib source bytes."""
    X, Y = byte_lm_data(seq_len=32, num_bytes=1 << 16)
    n_train = int(0.9 * len(X))
    return dict(make_model=byte_lm, data=(X[:n_train], Y[:n_train]), eval_data=(X[n_train:], Y[n_train:]),
                loss_fn=lm_loss, optimizer="adam", lr_target=0.05, steps=40 if quick else 150, batch_size=32,
                track_every=10 if quick else 15, warmup_steps=20,
                curvature_aware={"kind": "curvature_aware", "safety": 1.8, "every": 5},
                description="byte-level Transformer LM (1 block, d=32) on stdlib sources, Adam")


#: ``curvature compare --setup NAME`` → factory(quick) of a setup dict.
SETUPS: dict[str, Callable[[bool], dict]] = {"digits": digits_setup, "lm": byte_lm_setup}


def run_setup(name: str, quick: bool = False, schedules: Mapping[str, Any] | None = None, **overrides: Any
              ) -> ComparisonResult:
    """:func:`compare_schedules` on a bundled setup (``"digits"`` or ``"lm"``); ``overrides`` replace its
    settings (``steps``, ``lr_target``, ``seeds``, ``track_every``, ``batch_size``, ``warmup_steps``, ...). The
    default schedules use the setup's curvature-aware options."""
    if name not in SETUPS:
        raise ValueError(f"unknown setup {name!r}; choose from {sorted(SETUPS)}")
    cfg = SETUPS[name](quick)
    if schedules is None:
        schedules = dict(DEFAULT_SCHEDULES)
        schedules["curvature_aware"] = cfg["curvature_aware"]
    kw = {k: cfg[k] for k in ("optimizer", "steps", "lr_target", "track_every", "batch_size", "warmup_steps",
                              "loss_fn", "eval_data")}
    kw.update(overrides)
    return compare_schedules(cfg["make_model"], cfg["data"], schedules, **kw)


# ---------------------------------------------------------------------------------------------------
# Command line: `curvature compare`
# ---------------------------------------------------------------------------------------------------
def add_compare_subcommand(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``compare`` to an ``argparse`` sub-parser set; the parser's default ``func`` is :func:`run_compare`."""
    from ._cli_defaults import add_compare_arguments

    p = add_compare_arguments(subparsers)
    p.set_defaults(func=run_compare)
    return p


#: Measured wall time per training step of one run (tracking and the schedules' own measurements included,
#: averaged over the default schedules, one thread on a shared 2-core CPU); for the runtime estimate.
_SECONDS_PER_STEP = {"digits": 0.015, "lm": 0.05}


def _duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.0f} min"


def run_compare(args: argparse.Namespace) -> int:
    """Run ``curvature compare``: prints the table, writes the CSV and the figure; returns 0 (divergences are
    results, not errors), 2 for bad arguments."""
    import csv

    cfg = SETUPS[args.setup](bool(args.quick))
    schedules: dict[str, Any] = dict(DEFAULT_SCHEDULES)
    schedules["curvature_aware"] = dict(cfg["curvature_aware"])
    if getattr(args, "safety", None) is not None:
        schedules["curvature_aware"]["safety"] = float(args.safety)
    if args.schedules:
        names = [s.strip() for s in args.schedules.split(",") if s.strip()]
        unknown = [s for s in names if s not in schedules]
        if unknown:
            print(f"curvature compare: unknown schedules {unknown}; choose from {list(schedules)}")
            return 2
        schedules = {s: schedules[s] for s in names}
    try:
        seeds = [int(s) for s in str(args.seeds).split(",") if s.strip()]
    except ValueError:
        print(f"curvature compare: --seeds must be comma-separated integers, got {args.seeds!r}")
        return 2
    overrides: dict[str, Any] = {"seeds": seeds or [0]}
    for key, attr in (("steps", "steps"), ("lr_target", "lr_target"), ("warmup_steps", "warmup"),
                      ("track_every", "track_every"), ("batch_size", "batch_size")):
        value = getattr(args, attr, None)
        if value is not None:
            overrides[key] = value
    if overrides.get("track_every") == 0:
        overrides["track_every"] = None
    threads = torch.get_num_threads()
    if getattr(args, "threads", None):
        torch.set_num_threads(int(args.threads))
    quiet = bool(getattr(args, "quiet", False))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    csv_path = out / "comparison.csv"
    finished: list[dict] = []

    def save(row: dict, done: int, total: int) -> None:  # rewritten after every run: partial results survive
        finished.append(row)
        tmp = csv_path.with_suffix(".csv.tmp")
        with tmp.open("w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(SUMMARY_KEYS))
            w.writeheader()
            for r in finished:
                w.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in SUMMARY_KEYS})
        os.replace(tmp, csv_path)

    steps = int(overrides.get("steps", cfg["steps"]))
    runs = len(schedules) * len(overrides["seeds"])
    per_step = _SECONDS_PER_STEP.get(args.setup, 0.05)
    if not quiet:
        print(f"curvature compare: {cfg['description']}; η_trgt = {overrides.get('lr_target', cfg['lr_target'])}, "
              f"{steps} steps, {runs} run(s): {', '.join(schedules)}", flush=True)
        print(f"  expected runtime: about {_duration(per_step * steps * runs)} on one CPU thread "
              f"(measured: {per_step * 1e3:.0f} ms per step with tracking); {csv_path} is rewritten after each run",
              flush=True)
    try:
        res = run_setup(args.setup, bool(args.quick), schedules, verbose=not quiet, on_row=save, **overrides)
    finally:
        torch.set_num_threads(threads)
    png = out / "comparison.png"
    try:
        import matplotlib

        matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt

        fig = res.plot(png, title=cfg["description"])
        plt.close(fig)
    except ImportError as exc:
        png = None
        print(f"(no figure: {exc})")
    print(("" if quiet else "\n") + res.table())
    if not quiet:
        print(f"\nwrote {csv_path}" + (f" and {png}" if png else ""))
    return 0
