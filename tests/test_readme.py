"""The README as a newcomer reads it: every ```python block runs as written (self-contained, fast), the set-up
commands are the ones CI runs, and the distribution name is the one that installs."""
import re
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
TEXT = README.read_text()
BLOCKS = re.findall(r"```python\n(.*?)```", TEXT, flags=re.S)


def test_every_python_block_is_collected():
    # no filter: a block that is a fragment fails here instead of being skipped
    assert len(BLOCKS) == TEXT.count("```python") >= 8


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_block_runs(index, tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    block = BLOCKS[index]
    if "lightning" in block:
        pytest.importorskip("lightning")
    if "transformers" in block:
        pytest.importorskip("transformers")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MPLBACKEND", "Agg")
    t0 = time.perf_counter()
    exec(compile(block, f"README.md[python block {index}]", "exec"), {"__name__": "__readme__"})
    assert time.perf_counter() - t0 < 60, "README examples must stay fast"


def test_setup_commands_are_what_ci_runs():
    ci = (ROOT / ".ci" / "run").read_text()
    test_cmd = 'pip install torch==2.13.0 && pip install -e ".[dev]" && python -m pytest -q'
    assert test_cmd in TEXT
    assert 'pip install -e ".[demo]" && curvature demo' in TEXT
    assert test_cmd in ci.splitlines()  # .ci/run runs exactly the README's command
    first_screen = "\n".join(TEXT.splitlines()[:60])
    assert "torch-curvature" in first_screen and "```bash" in first_screen and "```python" in first_screen


def test_distribution_name_and_placeholders():
    pyproject = (ROOT / "pyproject.toml").read_text()  # (tomllib is 3.11+; the package supports 3.10)
    assert re.search(r'^name = "torch-curvature"$', pyproject, flags=re.M)
    assert re.search(r'^license = "MIT"$', pyproject, flags=re.M) and (ROOT / "LICENSE").exists()
    for heading in ("## Using it with Hugging Face models", "## Tracking during training",
                    "## Distributed and large models", "## Promises"):
        assert heading in TEXT, heading
    for link in re.findall(r"\]\(((?:docs|notebooks)/[^)#]*)\)", TEXT):
        assert (ROOT / link).exists(), link
