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


# -- every example runs with only the extras the README names (#25.4) -------------------------------------------
#: What a block needs beyond its imports: curvature modules that import optional packages, and strings that make
#: a library import one at run time (HF's report_to=["tensorboard"] loads tensorboard).
IMPLIED = {
    r"curvature\.integrations\.transformers": ("transformers", "accelerate"),
    r"curvature\.integrations\.lightning": ("lightning",),
    r"\bplot_(sharpness|spectrum)\b|curvature\.plotting": ("matplotlib",),
    r"\.to_dataframe\(": ("pandas",),
    r"SummaryWriter|TensorBoardSink|[\"']tensorboard[\"']": ("tensorboard",),
    r"report_to\s*=\s*\[?[^\]\n]*[\"']wandb[\"']": ("wandb",),
    r"report_to\s*=\s*\[?[^\]\n]*[\"']mlflow[\"']": ("mlflow",),
}
#: The README's Set-up installs the demo extra first; every later section adds the extras it names.
BASE_EXTRAS = ("demo",)


def _norm(name):
    return re.sub(r"[-_.]+", "-", name).lower()


def _extras():
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return project.get("dependencies", []), project["optional-dependencies"]


def _closure(requirements):
    """Distributions installed by these requirement strings, with their dependencies (from installed metadata;
    a distribution that is not installed here counts as itself)."""
    from importlib import metadata

    from packaging.requirements import Requirement

    seen, todo = set(), list(requirements)
    while todo:
        req = Requirement(todo.pop())
        if req.marker is not None and not req.marker.evaluate({"extra": ""}):
            continue
        name = _norm(req.name)
        if name in seen:
            continue
        seen.add(name)
        try:
            todo.extend(metadata.requires(req.name) or [])
        except metadata.PackageNotFoundError:
            pass
    return seen


def _providers(module):
    from importlib import metadata

    return {_norm(d) for d in metadata.packages_distributions().get(module, [])} or {_norm(module)}


def _needs(block):
    import ast
    import io
    import sys
    import tokenize

    modules = set()
    for node in ast.walk(ast.parse(block)):
        if isinstance(node, ast.Import):
            modules |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            modules.add(node.module.split(".")[0])
    code = "".join(tok.string + " " for tok in tokenize.generate_tokens(io.StringIO(block).readline)
                   if tok.type != tokenize.COMMENT)  # "# also .jsonl, SummaryWriter" needs nothing
    for pattern, implied in IMPLIED.items():
        if re.search(pattern, code):
            modules |= set(implied)
    return {m for m in modules if m not in sys.stdlib_module_names and m not in ("curvature", "torch")}


def _blocks_with_extras():
    """(block, extras its section names): the prose between the previous block (or heading) and this one names
    its install line, ``pip install -e ".[a,b]"``."""
    out, last = [], 0
    for m in re.finditer(r"```python\n(.*?)```", TEXT, flags=re.S):
        prose = TEXT[last:m.start()]
        prose = prose[prose.rfind("\n## ") + 1:] if "\n## " in prose else prose
        named = {e.strip() for group in re.findall(r'pip install -e "\.\[([^\]]+)\]"', prose) for e in group.split(",")}
        out.append((m.group(1), set(BASE_EXTRAS) | named))
        last = m.end()
    return out


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_block_needs_only_the_extras_it_names(index):
    pytest.importorskip("packaging")
    pytest.importorskip("tomllib")
    block, extras = _blocks_with_extras()[index]
    base, optional = _extras()
    unknown = extras - set(optional)
    assert not unknown, f"README names extras that pyproject.toml lacks: {unknown}"
    installed = _closure(["torch"] + list(base) + [r for e in extras for r in optional[e]])
    missing = sorted(m for m in _needs(block) if not _providers(m) & installed)
    assert not missing, (f"README block {index} needs {missing}, which `pip install -e \".[{','.join(sorted(extras))}]\"` "
                         "does not install: name the extra in the text before the block, or add it to pyproject.toml")


def test_the_extras_check_catches_a_missing_extra():
    # the HF Trainer example as it was (#25.4): report_to=["tensorboard"] after installing only [transformers]
    block = 'from curvature.integrations.transformers import SharpnessCallback\nargs = X(report_to=["tensorboard"])\n'
    base, optional = _extras()
    installed = _closure(["torch"] + list(base) + optional["transformers"])
    assert "tensorboard" in _needs(block) and not _providers("tensorboard") & installed


def test_tracking_section_leads_with_what_to_leave_on_and_every_column_is_documented():
    section = TEXT[TEXT.index("## Tracking during training"):]
    first = section.split("\n\n")[1]
    assert first.startswith("**What to leave on, and what it costs.**") and "every=" in first and "%" in first
    assert "docs/tracking.md#the-columns-of-a-row" in section and "docs/tracking.md#adams-edge-ratio-at-step-0" in section
    from curvature.tracking import ROW_KEYS

    doc = (ROOT / "docs" / "tracking.md").read_text()
    table = doc[doc.index("## The columns of a row"):]
    table = table[:table.index("\n## ", 10)]
    documented = set(re.findall(r"`(\w+)`", table))
    assert not set(ROW_KEYS) - documented, f"columns missing from docs/tracking.md: {set(ROW_KEYS) - documented}"
