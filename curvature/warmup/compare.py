r"""Compare learning-rate warm-up schedules on the same model: loss, accuracy, sharpness, divergence.

:func:`compare_schedules` trains one model (same initialisation, same mini-batches) under each schedule and
returns a :class:`ComparisonResult`: one summary row per (schedule, seed) — final / minimum loss, accuracy (for
classification), sharpness and edge ratio (measured with a warm-started
:class:`~curvature.tracking.SharpnessTracker`), the step at which the schedule reached ``lr_target``, the overhead
of schedules that measure (Hessian-vector products, forward passes) and whether the run diverged — plus the
curves behind it (:meth:`ComparisonResult.plot`: loss, λ and lr against the step).

A run *diverges* when the training loss is not finite or exceeds ``divergence_factor × L_0`` (``L_0`` the loss of
the first step); it is flagged and stopped, never raised. An exception inside a run (a schedule that fails)
is also caught and reported in the row's ``failure``.

Schedules (``schedules={name: spec}``; ``None`` = :data:`DEFAULT_SCHEDULES`), each ``spec`` one of:

* a name: ``"constant"`` (no warm-up), ``"linear"``, ``"exponential"``, ``"cosine"`` (linear warm-up + cosine
  decay), ``"wsd"`` (warmup-stable-decay), ``"catapult"`` (linear warm-up from the catapult critical lr
  ``η_init = η_c``, Kalra & Barkeshli, arXiv 2406.09405), ``"persistent_catapult"``, ``"loss_adaptive"``
  (``η_t = η_trgt/(1 + C·L_t)``, Alimisis, Islamov & Lucchi, arXiv 2510.03164, with ``C`` chosen so that
  ``η_0 = init_fraction·η_trgt``), ``"curvature_aware"`` (:class:`~curvature.warmup.feedback.CurvatureAwareWarmup`);
* a dict ``{"kind": name, **options}`` (``warmup_steps``, ``safety``, ``every``, ``delta``, ...);
* a :class:`~curvature.warmup.Schedule` or any ``callable(step) -> lr``.

The ``curvature compare`` command and its two bundled setups are in :mod:`curvature.compare`.
"""
from __future__ import annotations

import copy
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..hvp import call_model

__all__ = ["compare_schedules", "ComparisonResult", "DEFAULT_SCHEDULES", "SUMMARY_KEYS", "find_required_warmup",
           "lm_loss"]

#: The default set of schedules (``schedules=None``).
DEFAULT_SCHEDULES: dict[str, Any] = {
    "none": "constant",
    "linear": "linear",
    "exponential": "exponential",
    "cosine": "cosine",
    "wsd": "wsd",
    "catapult": "catapult",
    "loss_adaptive": "loss_adaptive",
    "curvature_aware": "curvature_aware",
}

_KINDS = ("constant", "linear", "exponential", "cosine", "wsd", "catapult", "persistent_catapult",
          "loss_adaptive", "curvature_aware")

SUMMARY_KEYS = ("schedule", "seed", "optimizer", "lr_target", "steps", "steps_run", "diverged", "diverged_step",
                "failure", "initial_loss", "final_loss", "min_loss", "final_accuracy", "steps_to_target",
                "max_lr", "max_edge_ratio", "final_sharpness", "tracking_hvps", "schedule_hvps",
                "schedule_forward_passes", "seconds")


# ---------------------------------------------------------------------------------------------------
# Result
# ---------------------------------------------------------------------------------------------------
@dataclass
class ComparisonResult:
    """What :func:`compare_schedules` returns.

    Attributes:
        rows: one summary dict per (schedule, seed), keys :data:`SUMMARY_KEYS`.
        curves: ``{(schedule, seed): {"step", "lr", "loss", "accuracy": lists per step,
            "tracked": tracker rows (step, lr, loss, sharpness, preconditioned_sharpness, edge_ratio, ...)}}``.
        config: the settings of the comparison.
    """

    rows: list[dict]
    curves: dict[tuple[str, int], dict[str, Any]] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)

    def to_dataframe(self) -> Any:
        """``rows`` as a ``pandas.DataFrame`` (needs pandas)."""
        import pandas as pd

        return pd.DataFrame(self.rows, columns=list(SUMMARY_KEYS))

    def row(self, schedule: str, seed: int | None = None) -> dict:
        """The summary row of ``schedule`` (first seed unless given)."""
        for r in self.rows:
            if r["schedule"] == schedule and (seed is None or r["seed"] == seed):
                return r
        raise KeyError(schedule)

    @property
    def diverged(self) -> list[str]:
        """Names of the schedules that diverged (or failed) for at least one seed."""
        return list(dict.fromkeys(r["schedule"] for r in self.rows if r["diverged"] or r["failure"]))

    def table(self, keys: Sequence[str] = ("schedule", "seed", "diverged", "final_loss", "final_accuracy",
                                           "steps_to_target", "max_edge_ratio", "schedule_hvps", "seconds")) -> str:
        """A plain-text table of the rows."""
        def fmt(v: Any) -> str:
            if v is None:
                return "-"
            if isinstance(v, bool):
                return "yes" if v else "no"
            if isinstance(v, float):
                return f"{v:.4g}"
            return str(v)

        cells = [[k for k in keys]] + [[fmt(r.get(k)) for k in keys] for r in self.rows]
        widths = [max(len(c[i]) for c in cells) for i in range(len(keys))]
        return "\n".join("  ".join(c[i].ljust(widths[i]) for i in range(len(keys))) for c in cells)

    def __str__(self) -> str:
        return self.table()

    def plot(self, path: str | os.PathLike | None = None, title: str | None = None, seed: int | None = None,
             axes: Sequence[Any] | None = None) -> Any:
        """Loss, sharpness λ (λ_max(P⁻¹H) for Adam) and lr against the step, one line per schedule (one seed:
        the first unless given); a cross marks a divergence. ``axes``: three matplotlib axes to draw on (default:
        a new figure). Saves to ``path`` when given; returns the figure."""
        import matplotlib.pyplot as plt

        from ..plotting import log_scale

        seeds = sorted({s for _, s in self.curves})
        seed = seeds[0] if seed is None and seeds else seed
        if axes is None:
            fig, axes = plt.subplots(1, 3, figsize=(15, 4.6))
        else:
            fig = axes[0].figure
        adam = self.config.get("preconditioned", False)
        cmap = plt.get_cmap("tab10")
        losses: list[float] = []
        lams: list[float] = []
        styles = ["-", "--", "-.", ":"]
        for i, (name, s) in enumerate(k for k in self.curves if k[1] == seed):
            c = self.curves[(name, s)]
            color, ls = cmap(i % 10), styles[(i // 10) % 4]
            steps, loss = c["step"], c["loss"]
            finite = [(t, v) for t, v in zip(steps, loss) if v is not None and math.isfinite(v) and v > 0]
            row = self.row(name, s)
            label = name + (" (diverged)" if row["diverged"] else "")
            if finite:
                axes[0].plot(*zip(*finite), color=color, ls=ls, label=label, lw=1.3)
                losses += [v for _, v in finite]
            if row["diverged"] and finite:
                axes[0].plot(finite[-1][0], finite[-1][1], "x", color=color, ms=9, mew=2)
            key = "preconditioned_sharpness" if adam else "sharpness"
            tr = [(r["step"], r[key]) for r in c["tracked"] if r.get(key) is not None and math.isfinite(r[key])
                  and r[key] > 0]
            if tr:
                axes[1].plot(*zip(*tr), ls=ls, color=color, label=name, lw=1.3, marker=".", ms=3)
                lams += [v for _, v in tr]
            axes[2].plot(steps, c["lr"], color=color, ls=ls, label=label, lw=1.3)
        lr_target = self.config.get("lr_target")
        numerator = self.config.get("threshold_numerator")
        if lr_target:
            axes[2].axhline(lr_target, color="k", ls=":", lw=1, label=r"$\eta_{\mathrm{trgt}}$")
            if numerator and math.isfinite(numerator):  # the threshold every schedule ends at
                thr = numerator / lr_target
                name = (rf"${numerator:g}/\eta_{{\mathrm{{trgt}}}}$ (threshold at the target lr)" if not adam else
                        rf"${numerator:g}/\eta_{{\mathrm{{trgt}}}}$ (Adam threshold at the target lr)")
                axes[1].axhline(thr, color="k", ls="--", lw=1.1, label=name)
                lams.append(thr)
        if losses:
            log_scale(axes[0], losses)
        if lams:
            log_scale(axes[1], lams)
        axes[0].set(xlabel="step", ylabel="training loss", title="training loss")
        axes[1].set(xlabel="step", ylabel=r"$\lambda_{\max}(P^{-1}H)$" if adam else r"$\lambda_{\max}(H)$",
                    title="pre-conditioned sharpness" if adam else "sharpness")
        axes[2].set(xlabel="step", ylabel=r"learning rate $\eta$", title="learning rate")
        axes[2].legend(fontsize=7, loc="center left", bbox_to_anchor=(1.02, 0.5), frameon=False)
        if lr_target and numerator:
            axes[1].legend(handles=axes[1].get_lines()[-1:], fontsize=7, loc="upper right")
        for ax in axes:
            ax.grid(alpha=0.3)
        if title:
            fig.suptitle(title)
        fig.tight_layout()
        if path is not None:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            fig.savefig(path, dpi=110)
        return fig


# ---------------------------------------------------------------------------------------------------
# Schedule drivers: each sets the lr of step t (before optimizer.step())
# ---------------------------------------------------------------------------------------------------
def _set_all(opt: torch.optim.Optimizer, lr: float) -> None:
    for g in opt.param_groups:
        g["lr"] = lr


class _FixedDriver:
    def __init__(self, fn: Callable[[int], float], opt: torch.optim.Optimizer) -> None:
        self.fn, self.opt = fn, opt
        self.hvps = self.forward_passes = 0
        self.controller = None

    def __call__(self, t: int, loss: torch.Tensor, batch: Any) -> float:
        lr = float(self.fn(t))
        _set_all(self.opt, lr)
        return lr


class _ControllerDriver:
    def __init__(self, controller: Any, opt: torch.optim.Optimizer, hvps: Callable[[], int],
                 forward: Callable[[], int] = lambda: 0, pass_batch: bool = True) -> None:
        self.controller, self.opt, self._hvps, self._fwd, self.pass_batch = controller, opt, hvps, forward, pass_batch

    @property
    def hvps(self) -> int:
        return self._hvps()

    @property
    def forward_passes(self) -> int:
        return self._fwd()

    def __call__(self, t: int, loss: torch.Tensor, batch: Any) -> float:
        if self.pass_batch:
            return float(self.controller.step(loss.detach(), batch))
        return float(self.controller.step(loss.detach()))


def _spec_kind(spec: Any) -> tuple[str | None, dict]:
    if isinstance(spec, str):
        return spec, {}
    if isinstance(spec, Mapping):
        opts = dict(spec)
        kind = opts.pop("kind", None)
        if kind is None:
            raise ValueError(f"a schedule dict needs a 'kind' (one of {_KINDS}), got {spec!r}")
        return kind, opts
    return None, {}


def _build_driver(spec: Any, ctx: dict) -> Any:
    from .adaptive import LossAdaptiveWarmup
    from .catapult import PersistentCatapultWarmup, catapult_warmup, find_critical_lr
    from .schedules import CosineDecay, ExponentialWarmup, LinearWarmup, WarmupStableDecay
    from .feedback import CurvatureAwareWarmup

    opt, lr_t, steps = ctx["optimizer"], ctx["lr_target"], ctx["steps"]
    kind, o = _spec_kind(spec)
    if kind is None:
        if callable(spec):
            return _FixedDriver(spec, opt)
        raise TypeError(f"cannot use {type(spec).__name__} as a schedule: give a name, a dict with 'kind', a "
                        "curvature.warmup.Schedule or a callable(step) -> lr")
    if kind not in _KINDS:
        raise ValueError(f"unknown schedule kind {kind!r}; choose from {_KINDS}")
    lr_target = float(o.pop("lr_target", lr_t))
    T = int(o.pop("warmup_steps", ctx["warmup_steps"]))
    if kind == "constant":
        return _FixedDriver(lambda t: lr_target, opt)
    if kind == "linear":
        return _FixedDriver(LinearWarmup(lr_target, T, float(o.pop("lr_init", 0.0))), opt)
    if kind == "exponential":  # 95% of η_trgt after T steps
        return _FixedDriver(ExponentialWarmup(lr_target, float(o.pop("time_constant", max(T, 1) / 3.0))), opt)
    if kind == "cosine":
        sched = LinearWarmup(lr_target, T).then(CosineDecay(lr_target, max(steps - T, 0), o.pop("lr_min", 0.0)))
        return _FixedDriver(sched, opt)
    if kind == "wsd":
        frac = float(o.pop("decay_fraction", 0.2))
        T = min(T, steps - int(round(frac * steps)))
        return _FixedDriver(WarmupStableDecay(lr_target, max(T, 0), steps, decay_fraction=frac), opt)
    model, loss_fn, first = ctx["model"], ctx["loss_fn"], ctx["first_batch"]
    adam = ctx["adam"]
    if kind == "catapult":
        res = find_critical_lr(model, loss_fn, first, ctx["optimizer_factory"], lr_target,
                               delta=float(o.pop("delta", 0.01 if adam else 0.1)))
        sched = catapult_warmup(res, lr_target, T)
        d = _FixedDriver(sched, opt)
        d.forward_passes = res.forward_passes
        d.critical = res
        return d
    if kind == "persistent_catapult":
        c = PersistentCatapultWarmup(opt, model, loss_fn, lr_target, delta=float(o.pop("delta", 0.01 if adam else 0.1)))
        return _ControllerDriver(c, opt, lambda: 0, lambda: sum(h["forward_passes"] for h in c.history))
    if kind == "loss_adaptive":
        frac = float(o.pop("init_fraction", 0.1))
        with torch.no_grad():
            l0 = float(loss_fn(call_model(model, first[0]), first[1]))
        loss_min = float(o.pop("loss_min", 0.0))
        C = float(o.pop("C", (1.0 / frac - 1.0) / max(l0 - loss_min, 1e-12)))
        c = LossAdaptiveWarmup(opt, lr_max=lr_target, C=C, loss_min=loss_min, ema=float(o.pop("ema", 0.0)))
        return _ControllerDriver(c, opt, lambda: 0, pass_batch=False)
    # curvature_aware
    o.setdefault("every", ctx.get("controller_every", 5))
    c = CurvatureAwareWarmup(opt, model, loss_fn, lr_target, **o)
    return _ControllerDriver(c, opt, lambda: c.num_hvps)


# ---------------------------------------------------------------------------------------------------
# The harness
# ---------------------------------------------------------------------------------------------------
def _make_optimizer(optimizer: Any) -> tuple[Callable, bool]:
    if callable(optimizer) and not isinstance(optimizer, str):
        return optimizer, None  # type: ignore[return-value]
    name = str(optimizer).lower()
    if name == "sgd":
        return (lambda params, lr: torch.optim.SGD(params, lr=lr)), False
    if name == "adam":
        return (lambda params, lr: torch.optim.Adam(params, lr=lr)), True
    if name == "adamw":
        return (lambda params, lr: torch.optim.AdamW(params, lr=lr)), True
    raise ValueError(f"optimizer must be 'sgd', 'adam', 'adamw' or a callable(params, lr), got {optimizer!r}")


def _call_model_factory(make_model: Callable, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    try:
        return make_model(seed=seed)
    except TypeError:
        torch.manual_seed(seed)
        return make_model()


def lm_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Cross-entropy over the last dimension (any leading shape)."""
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))


def _default_loss(targets: torch.Tensor) -> Callable:
    if targets.dtype in (torch.long, torch.int, torch.int16, torch.int8, torch.uint8):
        return lm_loss
    return F.mse_loss


def _is_classification(targets: torch.Tensor) -> bool:
    if not targets.dtype.is_floating_point:
        return True
    if targets.ndim == 2 and targets.shape[1] > 1:  # one-hot
        t = targets[: min(len(targets), 256)]
        return bool(((t == 0) | (t == 1)).all() and (t.sum(1) == 1).all())
    return False


def _accuracy(outputs: torch.Tensor, targets: torch.Tensor) -> float:
    with torch.no_grad():
        labels = targets if not targets.dtype.is_floating_point else targets.argmax(-1)
        return float((outputs.argmax(-1) == labels).float().mean())


def _batch_indices(n: int, batch_size: int | None, steps: int, seed: int) -> list[torch.Tensor | None]:
    if batch_size is None or batch_size >= n:
        return [None] * steps
    gen = torch.Generator().manual_seed(10_000 + seed)
    out: list[torch.Tensor | None] = []
    perm, pos = torch.randperm(n, generator=gen), 0
    for _ in range(steps):
        if pos + batch_size > n:
            perm, pos = torch.randperm(n, generator=gen), 0
        out.append(perm[pos:pos + batch_size])
        pos += batch_size
    return out


def compare_schedules(make_model: Callable[..., nn.Module], data: tuple[Any, torch.Tensor],
                      schedules: Mapping[str, Any] | None = None, optimizer: Any = "sgd", steps: int = 200,
                      seeds: Sequence[int] = (0,), lr_target: float = 0.1, track_every: int | None = 10,
                      batch_size: int | None = None, *, loss_fn: Callable | None = None,
                      warmup_steps: int | None = None, divergence_factor: float = 10.0,
                      eval_data: tuple[Any, torch.Tensor] | None = None, classification: bool | None = None,
                      controller_every: int = 5, tracker_tol: float = 1e-3, verbose: bool = False,
                      on_row: Callable[[dict, int, int], Any] | None = None) -> ComparisonResult:
    """Train ``make_model`` under each schedule and compare (see the module docs).

    Args:
        make_model: ``make_model(seed=...)`` (or ``make_model()``, called after ``torch.manual_seed(seed)``).
        data: the training set as one pair ``(inputs, targets)`` of tensors indexed along dim 0; mini-batches of
            ``batch_size`` are drawn from it (``None``: full batch), the same sequence for every schedule of a seed.
        schedules: ``{name: spec}``; ``None``: :data:`DEFAULT_SCHEDULES`.
        optimizer: ``"sgd"``, ``"adam"``, ``"adamw"`` or ``callable(params, lr)``.
        steps: training steps per run.
        seeds: one run per seed and schedule (the seed sets initialisation and batch order).
        lr_target: ``η_trgt``, the peak rate every schedule warms up to.
        track_every: measure λ every this many steps (``None``/0: no tracking, e.g. for sweeps).
        batch_size: mini-batch size (``None``: full batch).
        loss_fn: default cross-entropy over the last dim for integer targets (flattened, so LM targets work), MSE
            for float targets.
        warmup_steps: ``T`` of the fixed-length warm-ups (default ``steps // 5``).
        divergence_factor: a loss above ``divergence_factor × L_0`` (or non-finite) marks divergence.
        eval_data: data for the final accuracy (default: ``data``); accuracy only for classification
            (integer targets or one-hot float targets, or ``classification=True``).
        controller_every: the curvature-aware controller's ``every`` unless its spec sets one.
        tracker_tol: the tracker's eigensolver tolerance.
        verbose: print one line per run as it finishes (with the time left, estimated from the runs so far).
        on_row: ``on_row(row, done, total)`` after each run (e.g. to save partial results).
    """
    from ..optim import is_adam_like
    from ..tracking import SharpnessTracker

    schedules = dict(DEFAULT_SCHEDULES if schedules is None else schedules)
    if not schedules:
        raise ValueError("no schedules to compare")
    steps = int(steps)
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    factory, adam = _make_optimizer(optimizer)
    X, Y = data
    n = len(Y)
    loss_fn = loss_fn or _default_loss(Y)
    classification = _is_classification(Y) if classification is None else classification
    warmup_steps = max(1, steps // 5) if warmup_steps is None else int(warmup_steps)
    rows: list[dict] = []
    curves: dict[tuple[str, int], dict[str, Any]] = {}
    preconditioned = False
    numerator_seen: float | None = None

    def take(idx: torch.Tensor | None) -> tuple[Any, torch.Tensor]:
        if idx is None:
            return X, Y
        xs = {k: v[idx] for k, v in X.items()} if isinstance(X, Mapping) else X[idx]
        return xs, Y[idx]

    total = len(seeds) * len(schedules)
    t_all = time.perf_counter()
    for seed in seeds:
        order = _batch_indices(n, batch_size, steps, int(seed))
        for name, spec in schedules.items():
            t0 = time.perf_counter()
            row = dict.fromkeys(SUMMARY_KEYS)
            row.update(schedule=name, seed=int(seed), lr_target=float(lr_target), steps=steps, steps_run=0,
                       diverged=False, tracking_hvps=0, schedule_hvps=0, schedule_forward_passes=0)
            curve: dict[str, Any] = {"step": [], "lr": [], "loss": [], "accuracy": [], "tracked": []}
            curves[(name, int(seed))] = curve
            tracker = None
            try:
                model = _call_model_factory(make_model, int(seed))
                params = [p for p in model.parameters() if p.requires_grad]
                opt = factory(params, float(lr_target))
                adam_run = is_adam_like(opt) if adam is None else adam
                preconditioned = preconditioned or adam_run
                row["optimizer"] = type(opt).__name__
                ctx = dict(optimizer=opt, optimizer_factory=factory, lr_target=float(lr_target), steps=steps,
                           warmup_steps=warmup_steps, model=model, loss_fn=loss_fn, first_batch=take(order[0]),
                           adam=adam_run, controller_every=controller_every)
                driver = _build_driver(spec, ctx)
                numerator = _numerator(opt)
                numerator_seen = numerator if numerator_seen is None else numerator_seen
                if track_every:
                    tracker = SharpnessTracker(loss_fn, every=int(track_every), k=1, tol=tracker_tol)
                l0 = None
                for t in range(steps):
                    batch = take(order[t])
                    opt.zero_grad(set_to_none=True)
                    out = call_model(model, batch[0])
                    loss = loss_fn(out, batch[1])
                    value = float(loss.detach())
                    if l0 is None:
                        l0 = value
                        row["initial_loss"] = l0
                    curve["step"].append(t)
                    curve["loss"].append(value)
                    curve["accuracy"].append(_accuracy(out, batch[1]) if classification else None)
                    if not math.isfinite(value) or value > divergence_factor * abs(l0):
                        curve["lr"].append(curve["lr"][-1] if curve["lr"] else None)
                        row.update(diverged=True, diverged_step=t)
                        break
                    loss.backward()
                    lr = driver(t, loss, batch)
                    curve["lr"].append(lr)
                    if row["steps_to_target"] is None and lr >= float(lr_target) * (1 - 1e-9):
                        row["steps_to_target"] = t
                    if tracker is not None and tracker.should_measure(t):
                        tr = tracker.measure(model, opt, batch, step=t)
                        lam = tr.get("preconditioned_sharpness") or tr.get("sharpness")
                        entry = {k: tr.get(k) for k in ("step", "loss", "sharpness", "preconditioned_sharpness",
                                                        "num_hvps", "converged", "error")}
                        entry["lr"] = lr
                        entry["edge_ratio"] = lr * lam / numerator if lam is not None else None
                        curve["tracked"].append(entry)
                        row["tracking_hvps"] += int(tr.get("num_hvps") or 0)
                    opt.step()
                    row["steps_run"] = t + 1
                row["schedule_hvps"] = int(driver.hvps)
                row["schedule_forward_passes"] = int(driver.forward_passes)
                if driver.controller is not None and hasattr(driver.controller, "history"):
                    curve["decisions"] = list(driver.controller.history)
                if not row["diverged"]:
                    ex, ey = eval_data if eval_data is not None else data
                    with torch.no_grad():
                        out = call_model(model, ex)
                        final = float(loss_fn(out, ey))
                        if not math.isfinite(final) or final > divergence_factor * abs(l0):
                            row.update(diverged=True, diverged_step=steps)
                        if classification:
                            row["final_accuracy"] = _accuracy(out, ey)
            except Exception as exc:  # noqa: BLE001 - reported, never raised
                row["failure"] = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
            finally:
                if tracker is not None:
                    tracker.close()
            losses = [v for v in curve["loss"] if v is not None and math.isfinite(v)]
            row["final_loss"] = curve["loss"][-1] if curve["loss"] else None
            row["min_loss"] = min(losses) if losses else None
            lrs = [v for v in curve["lr"] if v is not None]
            row["max_lr"] = max(lrs) if lrs else None
            ratios = [r["edge_ratio"] for r in curve["tracked"] if r.get("edge_ratio") is not None]
            row["max_edge_ratio"] = max(ratios) if ratios else None
            lam_key = "preconditioned_sharpness" if preconditioned else "sharpness"
            lams = [r[lam_key] for r in curve["tracked"] if r.get(lam_key) is not None]
            row["final_sharpness"] = lams[-1] if lams else None
            row["seconds"] = time.perf_counter() - t0
            rows.append(row)
            if verbose:
                status = "DIVERGED" if row["diverged"] else ("FAILED" if row["failure"] else "ok")
                done = len(rows)
                left = (time.perf_counter() - t_all) / done * (total - done)
                final = "-" if row["final_loss"] is None else f"{row['final_loss']:.4g}"
                print(f"  [{done}/{total}] {name:<16} seed {seed}: {status:<8} final loss {final:<9} lr_target "
                      f"reached at step {row['steps_to_target']}  ({row['seconds']:.1f} s"
                      + (f"; about {left:.0f} s left)" if done < total else ")"), flush=True)
            if on_row is not None:
                on_row(row, len(rows), total)
    config = dict(optimizer=optimizer if isinstance(optimizer, str) else getattr(optimizer, "__name__", "callable"),
                  steps=steps, seeds=list(seeds), lr_target=float(lr_target), track_every=track_every,
                  batch_size=batch_size, warmup_steps=warmup_steps, divergence_factor=divergence_factor,
                  preconditioned=preconditioned, schedules={k: _describe(v) for k, v in schedules.items()},
                  threshold_numerator=numerator_seen)
    return ComparisonResult(rows, curves, config)


def _describe(spec: Any) -> Any:
    if isinstance(spec, (str, Mapping)):
        return copy.deepcopy(spec) if isinstance(spec, Mapping) else spec
    return repr(spec)


def _numerator(opt: torch.optim.Optimizer) -> float:
    from .feedback import threshold_numerator

    try:
        return threshold_numerator(opt)
    except (TypeError, ValueError):
        return math.nan


def find_required_warmup(make_model: Callable[..., nn.Module], data: tuple[Any, torch.Tensor], lr_target: float,
                         grid: Sequence[int] = (0, 5, 10, 20, 40, 80, 160), **kwargs: Any) -> dict:
    """The shortest linear warm-up (from 0 to ``lr_target``) in ``grid`` whose run does not diverge (for every seed).

    Runs :func:`compare_schedules` with ``{"linear-T": LinearWarmup}`` for each ``T`` (tracking off unless
    ``track_every`` is passed). Returns ``{"warmup_steps": T or None, "result": ComparisonResult, "grid": grid,
    "diverged": {T: bool}}``.
    """
    kwargs.setdefault("track_every", None)
    scheds = {f"linear-{T}": {"kind": "linear", "warmup_steps": int(T)} for T in grid}
    res = compare_schedules(make_model, data, scheds, lr_target=lr_target, **kwargs)
    diverged = {int(T): any(r["diverged"] or bool(r["failure"]) for r in res.rows if r["schedule"] == f"linear-{T}")
                for T in grid}
    ok = [T for T in grid if not diverged[int(T)]]
    return {"warmup_steps": min(ok) if ok else None, "result": res, "grid": list(grid), "diverged": diverged}
