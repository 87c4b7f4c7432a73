"""Timing utilities shared by the benchmark scripts.

- :func:`pin_threads` pins torch's and every BLAS/OpenMP pool's thread count (threadpoolctl), so that
  scipy and torch do not fight over the cores.
- :func:`touch_memory` writes a few GB once before timing: on a fresh VM the first large allocations
  are page-faulted in slowly (first HVPs were 40x slower there).
- :func:`time_fn` runs warm-ups, then ``repeat`` timed calls; medians; CUDA events + synchronize on
  GPU; peak memory on GPU via ``torch.cuda.max_memory_allocated`` (on CPU peak memory is not reported:
  tracemalloc does not see torch's allocator and RSS is too coarse to attribute to one call).
- :func:`environment` / :func:`header_markdown` record device, CPU/GPU name, versions, dtype, date.
"""
from __future__ import annotations

import contextlib
import datetime as _dt
import gc
import os
import platform
import statistics
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Sequence

import torch

__all__ = ["Timing", "time_fn", "pin_threads", "touch_memory", "environment", "header_markdown",
           "markdown_table", "sync", "fmt_s", "fmt_num", "peak_memory"]


def sync(device: torch.device | str | None = None) -> None:
    if device is not None and torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class Timing:
    median: float                 # seconds
    times: list[float] = field(default_factory=list)
    peak_mem_bytes: int | None = None  # GPU only: max_memory_allocated during the timed calls minus before
    error: str | None = None      # set when the call raised; times is then empty

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def min(self) -> float:
        return min(self.times) if self.times else float("nan")

    @property
    def iqr(self) -> float:
        if len(self.times) < 4:
            return float("nan")
        q = statistics.quantiles(self.times, n=4)
        return q[2] - q[0]


def _short_error(e: BaseException) -> str:
    msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
    if len(msg) > 160:
        msg = msg[:157] + "..."
    return f"{type(e).__name__}: {msg}"


def time_fn(fn: Callable[[], Any], *, warmup: int = 2, repeat: int = 7, device: torch.device | str = "cpu",
            min_time: float = 0.0, catch: bool = True) -> Timing:
    """Median wall time of ``fn()`` over ``repeat`` calls after ``warmup`` calls.

    On CUDA each call is timed with CUDA events between ``synchronize`` calls and the peak memory of
    the timed calls is recorded. ``min_time`` > 0 adds repeats until that much time has been spent.
    With ``catch=True`` an exception is returned as ``Timing(error=...)`` instead of raised.
    """
    dev = torch.device(device)
    cuda = dev.type == "cuda"
    try:
        for _ in range(warmup):
            fn()
        sync(dev)
        gc.collect()
        base_mem = None
        if cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(dev)
            base_mem = torch.cuda.memory_allocated(dev)
        times: list[float] = []
        spent = 0.0
        while len(times) < repeat or spent < min_time:
            if cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                torch.cuda.synchronize(dev)
                start.record()
                fn()
                end.record()
                torch.cuda.synchronize(dev)
                t = start.elapsed_time(end) / 1000.0
            else:
                t0 = time.perf_counter()
                fn()
                t = time.perf_counter() - t0
            times.append(t)
            spent += t
            if len(times) >= 1000:
                break
        peak = None
        if cuda:
            peak = int(torch.cuda.max_memory_allocated(dev) - base_mem)
        return Timing(statistics.median(times), times, peak)
    except Exception as e:  # noqa: BLE001 - benchmarks record failures instead of dying
        if not catch:
            raise
        return Timing(float("nan"), [], None, _short_error(e))


def peak_memory(fn: Callable[[], Any], device: torch.device | str) -> int | None:
    """Peak extra GPU memory of one call of ``fn`` (bytes); ``None`` on CPU."""
    dev = torch.device(device)
    if dev.type != "cuda":
        return None
    torch.cuda.synchronize(dev)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(dev)
    base = torch.cuda.memory_allocated(dev)
    fn()
    torch.cuda.synchronize(dev)
    return int(torch.cuda.max_memory_allocated(dev) - base)


@contextlib.contextmanager
def pin_threads(n: int | None):
    """Pin torch intra-op threads and all BLAS/OpenMP pools (threadpoolctl) to ``n`` (``None``: leave)."""
    if n is None:
        yield
        return
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        try:
            from threadpoolctl import threadpool_limits
        except ImportError:  # pragma: no cover - threadpoolctl is in the `bench` extra
            yield
            return
        with threadpool_limits(limits=n):
            yield
    finally:
        torch.set_num_threads(old)


def touch_memory(gb: float = 2.0, device: torch.device | str = "cpu") -> float:
    """Allocate and write ``gb`` GiB once (then free it); returns the seconds it took.

    A fresh VM maps pages lazily; the first big allocations of a benchmark otherwise pay for it.
    """
    if gb <= 0:
        return 0.0
    dev = torch.device(device)
    t0 = time.perf_counter()
    n = int(gb * 2**30 / 4)
    chunk = 2**26  # 256 MiB of float32 at a time, so a failed allocation costs little
    bufs = []
    try:
        done = 0
        while done < n:
            m = min(chunk, n - done)
            b = torch.empty(m, dtype=torch.float32, device=dev)
            b.fill_(1.0)
            bufs.append(b)
            done += m
    except (RuntimeError, MemoryError):
        pass
    sync(dev)
    del bufs
    gc.collect()
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    return time.perf_counter() - t0


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _pkg_version(name: str) -> str | None:
    try:
        from importlib.metadata import version
        return version(name)
    except Exception:  # noqa: BLE001
        return None


def environment(device: torch.device | str = "cpu", dtype: torch.dtype | None = None,
                threads: int | None = None) -> dict[str, Any]:
    dev = torch.device(device)
    env: dict[str, Any] = {
        "date": _dt.datetime.now().strftime("%Y-%m-%d %H:%M"),
        "device": str(dev),
        "cpu": _cpu_name(),
        "cpu_count": os.cpu_count(),
        "torch_threads": threads if threads is not None else torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "dtype": str(dtype).replace("torch.", "") if dtype is not None else None,
    }
    try:  # other processes on a shared machine distort absolute times; ratios in one process less so
        env["load average (1/5/15 min) at start"] = " / ".join(f"{x:.1f}" for x in os.getloadavg())
    except OSError:
        pass
    if dev.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(dev)
        env["cuda"] = torch.version.cuda
        env["gpu_memory_gib"] = round(torch.cuda.get_device_properties(dev).total_memory / 2**30, 1)
    try:
        import curvature
        env["curvature"] = getattr(curvature, "__version__", "?") + " (source tree)"
    except Exception:  # noqa: BLE001
        env["curvature"] = "not importable"
    for pkg in ("numpy", "scipy", "pyhessian", "hessian-eigenthings", "curvlinops-for-pytorch"):
        env[pkg] = _pkg_version(pkg) or "not installed"
    return env


def header_markdown(env: dict[str, Any], title: str, command: str | None = None) -> str:
    lines = [f"# {title}", ""]
    if command:
        lines += [f"Command: `{command}`", ""]
    lines += ["| key | value |", "| --- | --- |"]
    lines += [f"| {k} | {v} |" for k, v in env.items()]
    return "\n".join(lines) + "\n"


def fmt_s(t: float | None) -> str:
    """Seconds as a compact string in ms or s."""
    if t is None or t != t:  # NaN
        return "—"
    if t < 1e-3:
        return f"{t * 1e6:.0f} µs"
    if t < 1.0:
        return f"{t * 1e3:.2f} ms" if t < 0.1 else f"{t * 1e3:.1f} ms"
    return f"{t:.2f} s"


def fmt_num(x: float | None, digits: int = 3) -> str:
    if x is None or x != x:
        return "—"
    if isinstance(x, int):
        return str(x)
    return f"{x:.{digits}g}"


def markdown_table(rows: Sequence[dict[str, Any]], columns: Iterable[str] | None = None) -> str:
    rows = list(rows)
    if not rows:
        return "_(no rows)_\n"
    cols = list(columns) if columns is not None else list(rows[0].keys())
    out = ["| " + " | ".join(cols) + " |", "| " + " | ".join("---" for _ in cols) + " |"]
    for r in rows:
        out.append("| " + " | ".join(str(r.get(c, "")).replace("|", "\\|") for c in cols) + " |")
    return "\n".join(out) + "\n"


def import_curvature():
    """``curvature`` if its HVP engine is importable, else ``None`` (a harness still runs the rest)."""
    try:
        import curvature as cv
        cv.HessianOperator  # noqa: B018
        return cv
    except Exception:  # noqa: BLE001
        return None


def write_report(text: str, out: str | None, *, echo: bool = True) -> None:
    """Print a benchmark's markdown report (unless ``echo=False``) and write it to ``out`` when given."""
    if echo:
        print(text)
    if out:
        with open(out, "w") as f:
            f.write(text)
