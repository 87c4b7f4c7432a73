"""Cost of one Hessian-vector product, ours and the peers', side by side (same process, model and data).

    python -m benchmarks.hvp [--quick] [--size small] [--device cpu|cuda] [--models mlp cnn gpt ln_transformer]
                             [--ks 1 4 8 32] [--threads 2] [--compile] [--autocast] [--scaling] [--out FILE.md]

For each workload: the median time of one gradient (forward + backward, the unit), then of one HVP by
each method: plain torch double backward (no library, the reference), ``curvature.HessianOperator`` with
``method="reverse_over_reverse"`` / ``"forward_over_reverse"`` (``matvec``, and ``matmat`` with k columns,
reported per vector), and each installed peer. Columns: setup (building the operator, once), time per call,
per vector, ratio per-vector / gradient (median of interleaved gradient/HVP pairs), relative error of ``Hv`` against the reference, achieved GFLOP/s
(FLOPs from ``torch.utils.flop_counter.FlopCounterMode``), peak extra memory (GPU only).
Failures (a peer that cannot differentiate fused attention twice, curvlinops on train-mode BatchNorm) are
rows with the exception. ``--compile`` / ``--autocast`` (GPU only) add rows with ``torch.compile``-d models
and bf16 autocast. ``--scaling`` adds HVP time vs parameter count and vs batch size (MLP).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
import warnings
from typing import Any, Callable

import torch

from . import models as M
from curvature import peers as P
from ._timing import (Timing, environment, fmt_num, fmt_s, header_markdown, import_curvature, markdown_table,
                      pin_threads, time_fn, touch_memory)

COLUMNS = ["method", "k", "setup", "time/call", "time/vector", "HVP/grad", "rel.err vs ref", "GFLOP/s",
           "peak mem", "note"]


def count_flops(fn: Callable[[], Any]) -> int | None:
    try:
        from torch.utils.flop_counter import FlopCounterMode
        with FlopCounterMode(display=False) as fc:
            fn()
        return int(fc.get_total_flops())
    except Exception:  # noqa: BLE001
        return None


def _mem(b: int | None) -> str:
    return "—" if b is None else f"{b / 2**20:.0f} MiB"


def _err(a: torch.Tensor, ref: torch.Tensor) -> float:
    return float((a.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-300))


class Bench:
    def __init__(self, wl: M.Workload, device: torch.device, warmup: int, repeat: int, flops: bool = True,
                 autocast: bool = False):
        self.wl, self.device, self.warmup, self.repeat, self.flops = wl, device, warmup, repeat, flops
        self.autocast = autocast and device.type == "cuda"
        self.rows: list[dict[str, Any]] = []
        n = wl.num_params
        g = torch.Generator().manual_seed(1234)
        dtype = M.trainable_params(wl.model)[0].dtype
        self.V = torch.randn(n, 32, generator=g, dtype=torch.float64).to(device=device, dtype=dtype)
        self.V /= self.V.norm(dim=0, keepdim=True)
        self.v = self.V[:, 0].contiguous()
        ref = P.reference_hvp_fn(*wl.as_tuple())
        self.ref_v = ref(self.v)
        self._ref = ref
        self._ref_block: dict[int, torch.Tensor] = {}
        self.grad_time = float("nan")
        self._grad_call: Callable[[], Any] | None = None

    def ref_block(self, k: int) -> torch.Tensor:
        if k not in self._ref_block:
            self._ref_block[k] = torch.stack([self._ref(self.V[:, j].contiguous()) for j in range(k)], 1)
        return self._ref_block[k]

    def _ctx(self):
        if self.autocast:
            return torch.autocast("cuda", dtype=torch.bfloat16)
        import contextlib
        return contextlib.nullcontext()

    def add(self, method: str, build: Callable[[], Callable[[torch.Tensor], torch.Tensor]], k: int = 1,
            note: str = "", is_gradient: bool = False, sdpa_math: bool = False) -> Timing | None:
        """Time ``build()`` once (setup), then the returned callable on a k-column block (or a vector)."""
        row: dict[str, Any] = {"method": method, "k": k if not is_gradient else "—", "note": note}
        X = self.v if k == 1 else self.V[:, :k].contiguous()
        try:
            with P.math_sdpa(sdpa_math), self._ctx():
                t0 = time.perf_counter()
                fn = build()
                if self.device.type == "cuda":
                    torch.cuda.synchronize(self.device)
                setup = time.perf_counter() - t0
                call = (lambda: fn()) if is_gradient else (lambda: fn(X))
                out = call()  # first call: correctness (and it surfaces exceptions with a full message)
                timing = time_fn(call, warmup=self.warmup, repeat=self.repeat, device=self.device)
                fl = count_flops(call) if self.flops else None
                ratio = None
                if not is_gradient and self._grad_call is not None and timing.ok:
                    # Interleave gradient and HVP calls and take the median of the per-pair ratios: robust
                    # to load that drifts over the run (a shared machine), unlike a ratio of two medians.
                    rs = []
                    for _ in range(self.repeat):
                        tg = time_fn(self._grad_call, warmup=0, repeat=1, device=self.device)
                        th = time_fn(call, warmup=0, repeat=1, device=self.device)
                        rs.append(th.median / k / tg.median)
                    ratio = statistics.median(rs)
                if is_gradient and self._grad_call is None:
                    self._grad_call = call
        except P.PeerUnavailable as e:
            row.update({"setup": "—", "time/call": "skipped", "note": str(e)})
            self.rows.append(row)
            return None
        except Exception as e:  # noqa: BLE001 - record the failure, keep benchmarking
            msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
            row.update({"setup": "—", "time/call": "**fails**",
                        "note": (note + "; " if note else "") + f"`{type(e).__name__}: {msg[:150]}`"})
            self.rows.append(row)
            return None
        if not timing.ok:
            row.update({"setup": fmt_s(setup), "time/call": "**fails**", "note": timing.error})
            self.rows.append(row)
            return None
        per_vec = timing.median / k
        row.update({"setup": fmt_s(setup) if setup > 2e-4 else "—", "time/call": fmt_s(timing.median),
                    "time/vector": fmt_s(per_vec) if not is_gradient else "—",
                    "GFLOP/s": fmt_num(fl / timing.median / 1e9) if fl else "—",
                    "peak mem": _mem(timing.peak_mem_bytes)})
        if is_gradient:
            self.grad_time = timing.median
            row["HVP/grad"] = "1"
            row["rel.err vs ref"] = "—"
        else:
            row["HVP/grad"] = fmt_num(ratio if ratio is not None else per_vec / self.grad_time, 3)
            ref = self.ref_v if k == 1 else self.ref_block(k)
            out = out.detach()
            if out.shape != ref.shape:
                out = out.reshape(ref.shape)
            err = _err(out, ref)
            row["rel.err vs ref"] = f"{err:.1e}"
            if err > (1e-8 if ref.dtype == torch.float64 else 1e-4) and not self.autocast:
                row["rel.err vs ref"] = f"**{err:.1e} WRONG**"
        row["_median"] = timing.median
        row["_per_vec"] = per_vec
        row["_ratio"] = ratio if ratio is not None else (per_vec / self.grad_time if not is_gradient else 1.0)
        self.rows.append(row)
        return timing


def bench_workload(wl: M.Workload, device: torch.device, ks: list[int], warmup: int, repeat: int,
                   peers: list[str], compile_: bool = False, autocast: bool = False) -> tuple[str, list[dict]]:
    model, loss_fn, batch = wl.as_tuple()
    is_gpt = isinstance(model, M.GPT)
    b = Bench(wl, device, warmup, repeat, autocast=False)
    b.add("gradient (forward + backward)", lambda: P.gradient_fn(model, loss_fn, batch), is_gradient=True,
          note="default kernels" + (" (fused SDPA)" if is_gpt else ""))
    if is_gpt:
        b.add("gradient, math SDPA", lambda: P.gradient_fn(model, loss_fn, batch, math_attention=True),
              is_gradient=True, note="unit for the rows below stays the default gradient")
        b.grad_time = b.rows[0].get("_median", b.grad_time)
    b.add("torch double backward (reference)", lambda: P.reference_hvp_fn(model, loss_fn, batch),
          note="forward + create_graph backward + backward per HVP" + (", math SDPA" if is_gpt else ""))

    cv = import_curvature()
    if cv is None:
        b.rows.append({"method": "curvature.HessianOperator", "time/call": "skipped",
                       "note": "curvature.HessianOperator not importable yet"})
    else:
        variants = [("reverse_over_reverse", {}), ("forward_over_reverse", {})]
        variants.append(("reverse_over_reverse", {"cache_graph": False}))
        for method, kw in variants:
            label = f"ours {method}" + (" cache_graph=False" if kw else "")
            for k in ks:
                def build(method=method, kw=kw):
                    try:
                        op = cv.HessianOperator(model, loss_fn, batch, method=method, **kw)
                    except TypeError:
                        if kw:
                            raise
                        op = cv.HessianOperator(model, loss_fn, batch, method=method)
                    return op.matvec if k == 1 else op.matmat
                if kw and k > 1:
                    continue
                b.add(label, build, k=k, note="matvec" if k == 1 else "matmat")
    for peer in peers:
        label = {"pyhessian": "PyHessian", "hessian_eigenthings": "hessian-eigenthings",
                 "curvlinops": "curvlinops"}[peer]
        t = b.add(label, lambda peer=peer: P.hvp_fn(peer, model, loss_fn, batch),
                  note={"pyhessian": "re-uses one create_graph graph", "hessian_eigenthings": "",
                        "curvlinops": "vmap(jvp(jacrev))"}[peer])
        if t is None and is_gpt and P.available(peer):
            b.add(label + ", math SDPA", lambda peer=peer: P.hvp_fn(peer, model, loss_fn, batch),
                  sdpa_math=True, note="attention forced to the math kernel by the caller")
        if peer == "curvlinops" and P.available(peer):
            for k in ks:
                if k == 1:
                    continue
                b.add(label, lambda: P.matmat_fn("curvlinops", model, loss_fn, batch), k=k, sdpa_math=is_gpt,
                      note="matmat (vmap over columns)" + (", math SDPA" if is_gpt else ""))
    if device.type == "cuda" and (compile_ or autocast):
        _gpu_variants(b, wl, cv, compile_, autocast)
    title = f"### {wl.name} ({wl.size}): {wl.num_params:,} parameters, batch {wl.batch_size}\n\n{wl.notes}\n\n"
    return title + markdown_table(b.rows, COLUMNS), b.rows


def _gpu_variants(b: Bench, wl: M.Workload, cv, compile_: bool, autocast: bool) -> None:
    model, loss_fn, batch = wl.as_tuple()
    if autocast:
        ab = Bench(wl, b.device, b.warmup, b.repeat, autocast=True)
        ab.grad_time = b.grad_time
        ab.add("torch double backward, bf16 autocast", lambda: P.reference_hvp_fn(model, loss_fn, batch))
        if cv is not None:
            ab.add("ours reverse_over_reverse, bf16 autocast",
                   lambda: cv.HessianOperator(model, loss_fn, batch, method="reverse_over_reverse").matvec)
        b.rows.extend(ab.rows)
    if compile_:
        cm = torch.compile(model)
        b.add("torch double backward, torch.compile(model)", lambda: P.reference_hvp_fn(cm, loss_fn, batch))
        if cv is not None:
            for method in ("reverse_over_reverse", "forward_over_reverse"):
                b.add(f"ours {method}, torch.compile(model)",
                      lambda method=method: cv.HessianOperator(cm, loss_fn, batch, method=method).matvec)


def scaling(device: torch.device, dtype: torch.dtype, quick: bool, warmup: int, repeat: int) -> str:
    """HVP time (ours, reference) as the MLP's width (parameter count) and the batch grow."""
    cv = import_curvature()
    widths = [16, 64] if quick else [32, 128, 512, 1024]
    batches = [32, 128] if quick else [64, 256, 1024, 4096]
    out = ["### Scaling: HVP time vs parameter count (MLP, batch 256) and vs batch size (MLP width 128)\n"]
    rows = []
    for sweep, vals in (("width", widths), ("batch", batches)):
        for val in vals:
            kw = {"width": val, "batch_size": 256 if not quick else 32} if sweep == "width" else \
                {"width": 128 if not quick else 16, "batch_size": val}
            wl = M.mlp("small", device=device, dtype=dtype, depth=2, **kw)
            model, loss_fn, batch = wl.as_tuple()
            v = torch.randn(wl.num_params, device=device, dtype=dtype)
            tg = time_fn(P.gradient_fn(model, loss_fn, batch), warmup=warmup, repeat=repeat, device=device)
            ref = P.reference_hvp_fn(model, loss_fn, batch)
            tr = time_fn(lambda: ref(v), warmup=warmup, repeat=repeat, device=device)
            row = {"sweep": sweep, "params": f"{wl.num_params:,}", "batch": wl.batch_size,
                   "gradient": fmt_s(tg.median), "torch double backward": fmt_s(tr.median)}
            if cv is not None:
                for method in ("reverse_over_reverse", "forward_over_reverse"):
                    try:
                        op = cv.HessianOperator(model, loss_fn, batch, method=method)
                        t = time_fn(lambda: op.matvec(v), warmup=warmup, repeat=repeat, device=device)
                        row[f"ours {method}"] = f"{fmt_s(t.median)} ({t.median / tg.median:.2f}x grad)"
                    except Exception as e:  # noqa: BLE001
                        row[f"ours {method}"] = f"fails: {type(e).__name__}"
            rows.append(row)
    cols = ["sweep", "params", "batch", "gradient", "torch double backward", "ours reverse_over_reverse",
            "ours forward_over_reverse"]
    return "\n".join(out) + "\n" + markdown_table(rows, cols)


def summary(all_rows: dict[str, list[dict]]) -> str:
    """Median HVP/gradient ratio per method over the workloads (k = 1 rows that succeeded)."""
    by: dict[str, list[float]] = {}
    for rows in all_rows.values():
        for r in rows:
            if "_ratio" not in r or r["method"].startswith("gradient"):
                continue
            key = f"{r['method']} (k={r['k']})"
            by.setdefault(key, []).append(r["_ratio"])
    lines = [{"method": k, "workloads": len(v), "median HVP/grad": f"{statistics.median(v):.2f}",
              "range": f"{min(v):.2f}–{max(v):.2f}"} for k, v in by.items()]
    return "### Summary: time per HVP vector / time per gradient, median over workloads\n\n" + \
        markdown_table(lines, ["method", "workloads", "median HVP/grad", "range"])


def parse(argv=None):
    ap = argparse.ArgumentParser(prog="python -m benchmarks.hvp", description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny workloads, 1 warm-up, 3 repeats (tests)")
    ap.add_argument("--size", default=None, choices=M.SIZES, help="workload size (default small; tiny with --quick)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    ap.add_argument("--models", nargs="+", default=None, choices=sorted(M.WORKLOADS))
    ap.add_argument("--peers", nargs="*", default=list(P.PEERS), choices=list(P.PEERS))
    ap.add_argument("--ks", nargs="+", type=int, default=None, help="block sizes for matmat (default 1 4 8 32)")
    ap.add_argument("--threads", type=int, default=None, help="pin torch + BLAS threads (threadpoolctl)")
    ap.add_argument("--warmup", type=int, default=None)
    ap.add_argument("--repeat", type=int, default=None)
    ap.add_argument("--touch-gb", type=float, default=None, help="GiB to write once before timing (default 2; 0 in quick)")
    ap.add_argument("--compile", action="store_true", help="GPU only: add torch.compile(model) rows")
    ap.add_argument("--autocast", action="store_true", help="GPU only: add bf16 autocast rows")
    ap.add_argument("--scaling", action="store_true", help="add HVP time vs parameter count / batch size")
    ap.add_argument("--out", default=None, help="write the markdown report here")
    return ap.parse_args(argv)


def main(argv=None) -> str:
    a = parse(argv)
    size = a.size or ("tiny" if a.quick else "small")
    models = a.models or (["mlp", "cnn", "ln_transformer", "gpt"])
    ks = a.ks or ([1, 4] if a.quick else [1, 4, 8, 32])
    warmup = a.warmup if a.warmup is not None else (1 if a.quick else 2)
    repeat = a.repeat if a.repeat is not None else (3 if a.quick else 7)
    device = torch.device(a.device)
    dtype = getattr(torch, a.dtype)
    warnings.filterwarnings("ignore", category=UserWarning)
    with pin_threads(a.threads):
        touched = touch_memory(a.touch_gb if a.touch_gb is not None else (0 if a.quick else 2), device)
        env = environment(device, dtype, a.threads)
        env["workload size"] = size
        env["warm-up / repeats"] = f"{warmup} / {repeat} (median reported)"
        env["memory touched before timing"] = f"{a.touch_gb if a.touch_gb is not None else (0 if a.quick else 2)} GiB ({touched:.1f} s)"
        parts, all_rows = [], {}
        for name in models:
            wl = M.make(name, size, seed=0, device=device, dtype=dtype)
            md, rows = bench_workload(wl, device, ks, warmup, repeat, a.peers, a.compile, a.autocast)
            print(md, flush=True)
            parts.append(md)
            all_rows[name] = rows
        parts.insert(0, summary(all_rows))
        if a.scaling:
            parts.append(scaling(device, dtype, a.quick, warmup, repeat))
    cmd = "python -m benchmarks.hvp " + " ".join(sys.argv[1:] if argv is None else argv)
    report = header_markdown(env, "HVP cost, side by side", cmd) + "\n" + "\n".join(parts)
    if a.out:
        with open(a.out, "w") as fh:
            fh.write(report)
    print(parts[0])
    return report


if __name__ == "__main__":
    main()
