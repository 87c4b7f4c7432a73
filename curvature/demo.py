"""The demo job: a small MLP on scikit-learn's digits reaches the edge of stability during warm-up.

``curvature demo`` (or :func:`run_demo`) trains a 64-32-32-10 tanh MLP on the 8×8 digits that ship with
scikit-learn (1,437 training images, no download) by full-batch gradient descent (``torch.optim.SGD``) on the mean
squared error to one-hot targets, with the learning rate warmed up linearly from η_max/T to η_max = 5 over
T = 60 steps. Every 5 steps a :class:`~curvature.tracking.SharpnessTracker` measures λ_max of the loss Hessian
(warm-started LOBPCG). What it shows (the picture of Cohen et al., ICLR 2021, and of Kalra & Barkeshli,
arXiv 2406.09405):

* early in warm-up η is small: λ_max sits far below the stability threshold 2/η;
* as η grows, 2/η falls onto λ_max (η·λ_max/2 → 1, around step 50) — the *edge of stability*;
* past it, λ_max first keeps rising (progressive sharpening), the loss spikes (a catapult) and λ_max drops
  back; from then on λ_max hovers at 2/η (η·λ_max/2 ≈ 1.1–1.2) while the loss keeps falling, non-monotonically.

With ``--optimizer adam`` it is Adam (lr warmed up to 0.03) and the quantity that meets its threshold
(2+2β₁)/((1−β₁)η) = 38/η is the pre-conditioned sharpness λ_max(P⁻¹H).

It also saves a few checkpoints (``{"model", "optimizer", "step"}`` dicts, taken at the same moment as the
tracker's measurement of that step), analyses them offline with
:func:`~curvature.checkpoints.analyze_checkpoints`, and plots λ_max against 2/η with
:func:`~curvature.plotting.plot_sharpness`. The offline values equal the tracker's at the same steps.

The factories :func:`digits_model` and :func:`digits_data` are importable, so the checkpoints can be analysed
again from the command line::

    curvature analyze demo-out/checkpoints --model curvature.demo:digits_model \\
        --data curvature.demo:digits_data --loss mse --out results.csv
"""
from __future__ import annotations

import functools
import math
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["digits_model", "digits_data", "digits_loss", "run_demo", "DEMO_DEFAULTS"]

NUM_TRAIN = 1437  # 80% of the 1,797 images; the rest is held out

# Default settings per optimizer (``quick`` overrides steps / warm-up / every); one source with `curvature demo --help`.
from ._cli_defaults import DEMO_DEFAULTS  # noqa: E402
from ._cli_defaults import DEMO_QUICK as _QUICK  # noqa: E402


# ---------------------------------------------------------------------------------------------------
# Data and model factories (importable: curvature.demo:digits_model / curvature.demo:digits_data)
# ---------------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=2)
def _digits(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    try:
        from sklearn.datasets import load_digits
    except ImportError as exc:  # pragma: no cover - scikit-learn is in the demo extra
        raise ImportError("the demo needs scikit-learn (bundled digits data): pip install 'torch-curvature[demo]'") from exc
    X, y = load_digits(return_X_y=True)
    X = torch.as_tensor(X, dtype=torch.float64) / 16.0
    y = torch.as_tensor(y, dtype=torch.long)
    perm = torch.randperm(len(X), generator=torch.Generator().manual_seed(seed))
    X, y = X[perm], y[perm]
    train = X[:NUM_TRAIN]
    mean, std = train.mean(0), train.std(0).clamp_min(0.1)  # standardise with training statistics
    return (X - mean) / std, y


def digits_data(split: str = "train", dtype: torch.dtype = torch.float32, one_hot: bool = True
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """The digits as one batch ``(inputs, targets)``: inputs ``(N, 64)`` standardised pixels, targets one-hot
    ``(N, 10)`` (for :func:`digits_loss`, the mean squared error) or class indices with ``one_hot=False``.

    ``split="train"`` (default, 1,437 images: what the demo trains and measures on) or ``"test"`` (360).
    """
    X, y = _digits()
    if split == "train":
        X, y = X[:NUM_TRAIN], y[:NUM_TRAIN]
    elif split == "test":
        X, y = X[NUM_TRAIN:], y[NUM_TRAIN:]
    else:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    targets = F.one_hot(y, 10).to(dtype) if one_hot else y.clone()
    return X.to(dtype).clone(), targets


def digits_model(hidden: int = 32, seed: int = 0, dtype: torch.dtype = torch.float32) -> nn.Module:
    """The demo's network: ``64 → hidden → hidden → 10`` with tanh (smooth, so the Hessian is too)."""
    gen_state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        model = nn.Sequential(nn.Linear(64, hidden), nn.Tanh(), nn.Linear(hidden, hidden), nn.Tanh(),
                              nn.Linear(hidden, 10))
    finally:
        torch.random.set_rng_state(gen_state)
    return model.to(dtype)


def digits_loss(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The demo's loss: mean squared error to one-hot targets (``--loss mse`` on the command line)."""
    return F.mse_loss(outputs, targets)


# ---------------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------------
def _say(verbose: bool, *parts: Any) -> None:
    if verbose:
        print(*parts, flush=True)


def _checkpoint_steps(steps: int, warmup: int, count: int) -> list[int]:
    """A few steps spread over the run, with the end of warm-up among them."""
    picks = {0, min(warmup, steps - 1), steps - 1}
    for i in range(1, count):
        picks.add(round(i * (steps - 1) / count))
    return sorted(picks)


def run_demo(out: str | Path = "demo-out", optimizer: str = "sgd", steps: int | None = None,
             lr: float | None = None, warmup: int | None = None, every: int | None = None, seed: int = 0,
             quick: bool = False, progress: bool = False, verbose: bool = True,
             num_checkpoints: int | None = None) -> dict:
    """Train, track, checkpoint, analyse, plot (see the module docs). Returns a dict with ``history`` (tracker
    rows), ``analysis`` (rows of :func:`~curvature.checkpoints.analyze_checkpoints`), ``files`` (paths written),
    ``summary`` (edge-of-stability figures) and ``seconds``."""
    from .checkpoints import analyze_checkpoints, format_rows
    from .tracking import SharpnessTracker
    from .warmup import LinearWarmup

    t_start = time.perf_counter()
    if optimizer not in DEMO_DEFAULTS:
        raise ValueError(f"optimizer must be one of {sorted(DEMO_DEFAULTS)}, got {optimizer!r}")
    cfg = dict(DEMO_DEFAULTS[optimizer])
    if quick:
        cfg.update(_QUICK)
    steps = int(steps if steps is not None else cfg["steps"])
    warmup = int(warmup if warmup is not None else (cfg["warmup"] if steps == cfg["steps"] else max(1, steps * 3 // 10)))
    every = int(every if every is not None else cfg["every"])
    peak = float(lr if lr is not None else cfg["lr"])
    if steps < 2:
        raise ValueError(f"steps must be at least 2, got {steps}")
    if not (peak > 0 and math.isfinite(peak)):
        raise ValueError(f"lr must be a positive number, got {lr}")
    if warmup < 1 or every < 1:
        raise ValueError("warmup and every must be at least 1")
    n_ckpt = num_checkpoints if num_checkpoints is not None else (3 if quick else 5)

    out = Path(out)
    ckpt_dir = out / "checkpoints"
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    for old in ckpt_dir.glob("step_*.pt"):  # a previous run's checkpoints would mix into the analysis
        old.unlink()
    files = {"csv": out / "sharpness.csv", "png": out / "sharpness.png", "checkpoints": ckpt_dir,
             "analysis": out / "checkpoints.csv"}
    for key in ("csv", "analysis"):
        files[key].unlink(missing_ok=True)

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a 3.5k-parameter MLP: extra threads only add overhead (and contend)
    try:
        X, Y = digits_data("train")
        model = digits_model(seed=seed)
        n_params = sum(p.numel() for p in model.parameters())
        if optimizer == "sgd":
            opt: torch.optim.Optimizer = torch.optim.SGD(model.parameters(), lr=peak)
            what, threshold_name = "λ_max(H)", "2/η"
        else:
            opt = torch.optim.Adam(model.parameters(), lr=peak)
            what, threshold_name = "λ_max(P⁻¹H)", "38/η"
        schedule = LinearWarmup(lr_max=peak, warmup_steps=warmup, lr_init=peak / warmup)
        scheduler = schedule.lr_scheduler(opt, base_lr=peak)
        _say(verbose, f"curvature demo: {n_params:,}-parameter tanh MLP on {len(X):,} digits (scikit-learn), "
                      f"full-batch {type(opt).__name__}, MSE loss; lr warmed up linearly to {peak:g} over "
                      f"{warmup} steps, {steps} steps; {what} measured every {every} steps")
        ckpt_steps = set(_checkpoint_steps(steps, warmup, n_ckpt))
        tracker = SharpnessTracker(digits_loss, every=every, k=1, tol=1e-3, sinks=[files["csv"]])
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=steps, desc="training", unit="step", file=sys.stderr, dynamic_ncols=True)
        t_train = time.perf_counter()
        try:
            for t in range(steps):
                opt.zero_grad(set_to_none=True)
                loss = digits_loss(model(X), Y)
                if not torch.isfinite(loss):
                    raise FloatingPointError(f"the loss diverged (={loss.item()}) at step {t} with lr "
                                             f"{opt.param_groups[0]['lr']:.4g}; try a smaller --lr")
                loss.backward()
                row = tracker.step(model, opt, (X, Y), step=t)  # before opt.step(): θ_t and the lr of update t
                if t in ckpt_steps:
                    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "step": t},
                               ckpt_dir / f"step_{t:06d}.pt")
                opt.step()
                scheduler.step()
                if bar is not None:
                    bar.update(1)
                    if row is not None and row.get("edge_ratio") is not None:
                        bar.set_postfix_str(f"lr {row['lr']:.3g} loss {row['loss']:.4f} "
                                            f"λ/thr {row['edge_ratio']:.2f}", refresh=False)
        finally:
            if bar is not None:
                bar.close()
            tracker.close()
        train_seconds = time.perf_counter() - t_train
        history = tracker.history
        with torch.no_grad():
            Xt, yt = digits_data("test", one_hot=False)
            test_acc = float((model(Xt).argmax(1) == yt).float().mean())
            train_acc = float((model(X).argmax(1) == Y.argmax(1)).float().mean())

        summary = _summarise(history, warmup)
        _say(verbose, f"trained in {train_seconds:.1f} s: final loss {loss.item():.4f}, train accuracy "
                      f"{train_acc:.1%}, test accuracy {test_acc:.1%}; {len(history)} sharpness measurements, "
                      f"{sum(r['num_hvps'] or 0 for r in history)} Hessian-vector products")
        _say(verbose, _describe(summary, what, threshold_name))

        # Plot λ_max vs threshold (lr on a twin axis).
        try:
            from .plotting import plot_sharpness

            title = f"digits MLP, {type(opt).__name__}, linear warm-up to lr={peak:g} over {warmup} steps"
            _call_plot(plot_sharpness, history, files["png"], title)
        except ImportError as exc:
            files["png"] = None
            _say(verbose, f"(no plot: {exc})")

        # Offline: analyse the checkpoints as `curvature analyze` would.
        analysis = analyze_checkpoints(ckpt_dir, digits_model, (X, Y), digits_loss, k=1, tol=1e-4,
                                       out=files["analysis"], resume=False)
        _say(verbose, f"\ncheckpoints analysed offline (analyze_checkpoints, tol 1e-4) -> {files['analysis']}:")
        _say(verbose, format_rows(analysis))
        _say(verbose, f"\nwrote {files['csv']} (tracker rows), "
                      + (f"{files['png']} (plot), " if files["png"] else "")
                      + f"{ckpt_dir}/ ({len(ckpt_steps)} checkpoints), {files['analysis']}")
        _say(verbose, "analyse the checkpoints again from the shell:\n"
                      f"  curvature analyze {ckpt_dir} --model curvature.demo:digits_model "
                      f"--data curvature.demo:digits_data --loss mse --out results.csv")
    finally:
        torch.set_num_threads(threads)
    seconds = time.perf_counter() - t_start
    _say(verbose, f"demo finished in {seconds:.1f} s")
    return {"history": history, "analysis": analysis, "files": files, "summary": summary, "seconds": seconds,
            "test_accuracy": test_acc, "train_accuracy": train_acc}


def _call_plot(plot_sharpness: Any, rows: list[dict], path: Path, title: str) -> None:
    try:
        plot_sharpness(rows, path=path, title=title)
    except TypeError:  # an older signature without title=
        plot_sharpness(rows, path=path)


def _summarise(rows: list[dict], warmup: int) -> dict:
    """Edge-of-stability figures from tracker rows: where η·λ/2 (λ/threshold) first reaches 0.9 and 1, its peak,
    and its median after warm-up."""
    good = [r for r in rows if r.get("edge_ratio") is not None and not r.get("error")]
    ratios = [(r["step"], r["edge_ratio"]) for r in good]
    first09 = next((s for s, q in ratios if q >= 0.9), None)
    first1 = next((s for s, q in ratios if q >= 1.0), None)
    peak_step, peak = max(ratios, key=lambda sq: sq[1]) if ratios else (None, None)
    after = sorted(q for s, q in ratios if s >= warmup + 20) or sorted(q for s, q in ratios if s >= warmup)
    median_after = after[len(after) // 2] if after else None
    start = ratios[0][1] if ratios else None
    return {"first_step_ratio_0.9": first09, "first_step_ratio_1": first1, "peak_ratio": peak,
            "peak_step": peak_step, "median_ratio_after_warmup": median_after, "initial_ratio": start,
            "measurements": len(good)}


def _describe(summary: dict, what: str, threshold_name: str) -> str:
    if summary["measurements"] == 0:
        return "no successful sharpness measurement"
    lines = [f"edge of stability ({what} / {threshold_name}; 1 = the edge): {summary['initial_ratio']:.3f} at "
             f"the start"]
    if summary["first_step_ratio_1"] is not None:
        lines.append(f"reaches 1 at step {summary['first_step_ratio_1']}")
    elif summary["first_step_ratio_0.9"] is not None:
        lines.append(f"reaches 0.9 at step {summary['first_step_ratio_0.9']}")
    lines.append(f"peaks at {summary['peak_ratio']:.2f} (step {summary['peak_step']})")
    if summary["median_ratio_after_warmup"] is not None:
        lines.append(f"median {summary['median_ratio_after_warmup']:.2f} after warm-up")
    return ", ".join(lines)
