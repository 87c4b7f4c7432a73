"""Execute every notebook in ``notebooks/`` from scratch and fail on any exception or failed ``assert``.

Each notebook runs in a temporary copy of the ``notebooks/`` folder (so the committed, executed notebooks and
their figures are never rewritten; figures are saved with relative paths and land in the copy), with a kernel
that runs this very interpreter (``sys.executable``), so it works on a fresh CI machine without a registered
``python3`` kernelspec. Each notebook states a claim of Kalra & Barkeshli (arXiv 2406.09405) and ends with
asserts on the qualitative result.
"""
from __future__ import annotations

import json
import os
import shutil
import sys
import time
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")
pytest.importorskip("matplotlib")
pytest.importorskip("sklearn")
pytest.importorskip("pandas")

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ROOT / "notebooks"
PATHS = sorted(NOTEBOOKS.glob("*.ipynb"))
TIMEOUT = int(os.environ.get("CURVATURE_NOTEBOOK_TIMEOUT", "300"))  # seconds per cell


def _kernel_spec_dir(tmp: Path) -> Path:
    """A private kernelspec ``curvature-nb-test`` that launches ``sys.executable -m ipykernel_launcher``."""
    spec = tmp / "kernels" / "curvature-nb-test"
    spec.mkdir(parents=True, exist_ok=True)
    (spec / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "curvature notebook test",
        "language": "python",
    }))
    return tmp


@pytest.fixture(scope="module")
def kernel_env(tmp_path_factory):
    """Point Jupyter at the private kernelspec and make the repo importable from the kernel."""
    data_dir = _kernel_spec_dir(tmp_path_factory.mktemp("jupyter"))
    saved = {k: os.environ.get(k) for k in ("JUPYTER_PATH", "PYTHONPATH", "MPLBACKEND")}
    os.environ["JUPYTER_PATH"] = os.pathsep.join(filter(None, [str(data_dir), saved["JUPYTER_PATH"]]))
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), saved["PYTHONPATH"]]))
    os.environ["MPLBACKEND"] = "Agg"
    yield "curvature-nb-test"
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def test_notebooks_exist():
    names = {p.stem for p in PATHS}
    assert {"quickstart", "sgd_mechanisms", "adam_preconditioned", "catapult_warmup"} <= names


@pytest.mark.slow
@pytest.mark.parametrize("path", PATHS, ids=[p.stem for p in PATHS])
def test_notebook_runs(path: Path, tmp_path: Path, kernel_env: str):
    work = tmp_path / "notebooks"
    shutil.copytree(NOTEBOOKS, work, ignore=shutil.ignore_patterns("*.png", ".ipynb_checkpoints", "__pycache__"))
    nb = nbformat.read(work / path.name, as_version=4)
    for cell in nb.cells:                     # run from scratch
        if cell.cell_type == "code":
            cell.outputs, cell.execution_count = [], None
    client = nbclient.NotebookClient(nb, timeout=TIMEOUT, kernel_name=kernel_env, allow_errors=False,
                                     resources={"metadata": {"path": str(work)}})
    t0 = time.perf_counter()
    client.execute()                          # raises CellExecutionError on any exception / failed assert
    seconds = time.perf_counter() - t0
    print(f"{path.name}: {seconds:.1f} s")
    # the notebook's figure was written next to it, in the copy (relative paths), not into the repo
    figure = work / (path.stem + ".png")
    if (NOTEBOOKS / (path.stem + ".png")).exists():
        assert figure.exists(), f"{path.name} did not write {figure.name}"
