"""Accuracy and cost of the finite-difference HVP route (``method="finite_difference"``) per dtype.

For each benchmark model: the reference is the exact route (double backward) in float64 on the model's
weights. For each dtype (float64, float32, bfloat16 parameters, float32 master weights + bf16 autocast) the
model is copied to that dtype and we report

* HVP relative error ‖H_fd v − H v‖/‖H v‖ (max over 3 seeded unit directions), for central differences
  (order 2) and Richardson (order 4), next to the exact route run in the same dtype;
* λ_max relative error (Lanczos) of the FD operator and of the exact route in that dtype;
* cost per HVP: median seconds of one FD HVP / of one exact HVP (cached graph) / of one gradient
  (forward + backward), measured interleaved (grad, FD, exact, grad, ...) so load drifts hit all alike.

Run:  PYTHONPATH=. python benchmarks/finite_difference.py [--out benchmarks/results/finite-difference-cpu-DATE.md]
GPU:  PYTHONPATH=. python benchmarks/finite_difference.py --device cuda --size gpu --out benchmarks/results/finite-difference-gpu-DATE.md
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import statistics
import sys
import time

import torch

sys.path.insert(0, ".")
from benchmarks.models import make  # noqa: E402
from curvature.operators import HessianOperator  # noqa: E402
from curvature.solvers import lanczos  # noqa: E402

DTYPES = {"float64": (torch.float64, False), "float32": (torch.float32, False),
          "bfloat16": (torch.bfloat16, False), "fp32 + bf16 autocast": (torch.float32, True)}


def _cast_batch(batch, dtype):
    x, y = batch
    x = x.to(dtype) if x.is_floating_point() else x
    y = y.to(dtype) if y.is_floating_point() else y
    return x, y


def _rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm())


def _sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def measure(name: str, size: str, device: str, repeat: int) -> list[dict]:
    w = make(name, size, dtype=torch.float64, device=device)
    model, loss_fn, batch = w.as_tuple()
    ref = HessianOperator(model, loss_fn, batch, seed=0)
    n = ref.shape[0]
    V = torch.randn(n, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64).to(device)
    V = V / V.norm(dim=0, keepdim=True)
    HV = ref.matmat(V)
    lam_ref = float(lanczos(ref, 1, tol=1e-8).eigenvalues[0])
    rows = []
    for label, (dtype, autocast) in DTYPES.items():
        m = copy.deepcopy(model).to(dtype)
        b = _cast_batch(batch, dtype)
        ctx = (lambda: torch.autocast(torch.device(device).type, dtype=torch.bfloat16)) if autocast else contextlib.nullcontext
        row = {"model": f"{name} ({size}, n={n:,})", "dtype": label}
        tol = 1e-8 if dtype == torch.float64 else 1e-4
        with ctx():
            for order in (2, 4):
                fd = HessianOperator(m, loss_fn, b, method="finite_difference", fd_order=order, seed=0)
                row[f"hvp_fd{order}"] = max(_rel(fd.matmat(V[:, i:i + 1].to(dtype))[:, 0], HV[:, i]) for i in range(3))
                r = lanczos(fd, 1, tol=tol, max_iters=300)
                row[f"lam_fd{order}"] = abs(float(r.eigenvalues[0]) - lam_ref) / abs(lam_ref)
                row["h" if order == 2 else "h4"] = fd.engine.epsilon
            if not autocast:
                try:
                    ex = HessianOperator(m, loss_fn, b, seed=0)
                    row["hvp_exact"] = max(_rel(ex.matmat(V[:, i:i + 1].to(dtype))[:, 0], HV[:, i]) for i in range(3))
                    row["lam_exact"] = abs(float(lanczos(ex, 1, tol=tol, max_iters=300).eigenvalues[0]) - lam_ref) / abs(lam_ref)
                except Exception as exc:  # noqa: BLE001
                    row["hvp_exact"] = row["lam_exact"] = f"fails: {type(exc).__name__}"
            if dtype in (torch.float32, torch.float64) and not autocast:
                row.update(_cost(m, loss_fn, b, V[:, :1].to(dtype), device, repeat))
        rows.append(row)
        print(row, flush=True)
    return rows


def _cost(model, loss_fn, batch, v, device, repeat):
    fd = HessianOperator(model, loss_fn, batch, method="finite_difference", seed=0)
    ex = HessianOperator(model, loss_fn, batch, seed=0)
    params = [p for p in model.parameters() if p.requires_grad]

    def grad():
        torch.autograd.grad(loss_fn(model(batch[0]), batch[1]), params)

    calls = {"grad": grad, "fd": lambda: fd.matmat(v), "exact": lambda: ex.matmat(v)}
    times = {k: [] for k in calls}
    for f in calls.values():  # warm-up
        f()
    for _ in range(repeat):
        for k, f in calls.items():
            _sync(device)
            t0 = time.perf_counter()
            f()
            _sync(device)
            times[k].append(time.perf_counter() - t0)
    med = {k: statistics.median(t) for k, t in times.items()}
    return {"t_grad": med["grad"], "fd_over_grad": med["fd"] / med["grad"], "exact_over_grad": med["exact"] / med["grad"]}


def fmt(x):
    return x if isinstance(x, str) else ("—" if x is None else f"{x:.1e}")


def markdown(rows: list[dict]) -> str:
    out = ["| model | dtype | HVP err FD2 | HVP err FD4 | HVP err exact (same dtype) | λ_max err FD2 | λ_max err FD4 "
           "| λ_max err exact | h (FD2) |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        out.append(f"| {r['model']} | {r['dtype']} | {fmt(r['hvp_fd2'])} | {fmt(r['hvp_fd4'])} | {fmt(r.get('hvp_exact'))} "
                   f"| {fmt(r['lam_fd2'])} | {fmt(r['lam_fd4'])} | {fmt(r.get('lam_exact'))} | {r['h']:.1e} |")
    out += ["", "| model | dtype | one gradient | FD HVP / gradient | exact HVP / gradient |", "|---|---|---|---|---|"]
    for r in rows:
        if "t_grad" in r:
            out.append(f"| {r['model']} | {r['dtype']} | {r['t_grad'] * 1e3:.1f} ms | {r['fd_over_grad']:.2f} "
                       f"| {r['exact_over_grad']:.2f} |")
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--size", default="small")
    ap.add_argument("--models", default="mlp,gpt,ln_transformer,cnn")
    ap.add_argument("--repeat", type=int, default=15)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.set_num_threads(1)
    rows = []
    for name in args.models.split(","):
        size = "tiny" if name == "cnn" and args.size == "small" else args.size
        rows += measure(name, size, args.device, args.repeat)
    text = markdown(rows)
    print(text)
    if args.out:
        with open(args.out, "w") as fh:
            fh.write(f"# Finite-difference HVP route: accuracy and cost ({args.device}, torch {torch.__version__}, "
                     f"{time.strftime('%Y-%m-%d')}, 1 thread)\n\nCommand: `PYTHONPATH=. python benchmarks/finite_difference.py"
                     f" --device {args.device} --size {args.size} --out {args.out}`\n\nReference: exact route (double "
                     "backward) in float64 on the same weights; errors are relative, max over 3 seeded unit directions; "
                     "λ_max by Lanczos. Times: medians of interleaved calls.\n\n" + text + "\n")


if __name__ == "__main__":
    main()
