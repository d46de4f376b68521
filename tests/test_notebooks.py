"""Every notebook follows the skeleton and runs end to end under papermill in smoke mode."""

import ast
import json
import os
import subprocess

import jupytext
import pytest

from paper_lib.paths import REPO_ROOT
from paper_lib.run_notebooks import list_notebooks, run_notebook

NOTEBOOKS = list_notebooks()


def test_notebooks_exist_and_are_numbered_in_order():
    names = [p.stem for p in NOTEBOOKS]
    assert names and names[0] == "00_build_model_organism"
    assert [int(n[:2]) for n in names] == sorted(int(n[:2]) for n in names)


def test_only_py_notebooks_are_committed():
    """Policy: the jupytext .py is the source of truth; .ipynb files are generated, never committed."""
    tracked = subprocess.run(["git", "ls-files", "*.ipynb"], cwd=REPO_ROOT, capture_output=True, text=True)
    if tracked.returncode != 0:
        pytest.skip("not a git checkout")
    assert tracked.stdout.strip() == ""


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_follows_the_skeleton(path):
    nb = jupytext.read(path)
    cells = nb.cells
    assert cells[0].cell_type == "markdown" and cells[0].source.lstrip().startswith("# "), "H1 title first"
    assert "**Claim:**" in cells[0].source
    params = [c for c in cells if "parameters" in c.metadata.get("tags", [])]
    assert len(params) == 1, "exactly one parameters cell"
    tree = ast.parse(params[0].source)
    names = []
    for node in tree.body:
        value = node.value.operand if isinstance(node.value, ast.UnaryOp) and isinstance(node.value.op, ast.USub) else node.value
        assert isinstance(node, ast.Assign) and isinstance(value, ast.Constant), "flat literals only"
        names.append(node.targets[0].id)
    assert all(n.isupper() for n in names) and {"SEED", "SMOKE"} <= set(names)
    lines = params[0].source.splitlines()
    assert all("#" in line for line in lines if line.strip()), "each parameter has a comment"
    code = "\n".join(c.source for c in cells if c.cell_type == "code")
    assert "class " not in code and "sys.path" not in code
    # Sync: the .py -> .ipynb -> .py round trip keeps every cell, so a paired .ipynb is always regenerable.
    again = jupytext.reads(
        jupytext.writes(jupytext.reads(jupytext.writes(nb, fmt="ipynb"), fmt="ipynb"), fmt="py:percent"), fmt="py:percent"
    )
    assert [(c.cell_type, c.source, c.metadata.get("tags")) for c in again.cells] == [
        (c.cell_type, c.source, c.metadata.get("tags")) for c in cells
    ]


CELL_LINES = 25  # the most lines of code a cell may hold (blank, comment and import lines not counted)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_every_code_cell_reads_at_a_glance(path):
    """No code cell over CELL_LINES lines of code: long work lives in paper_lib, a notebook calls it. The
    parameters cell (one line a parameter, nanoGPT's config block) and import lines (a list of names) are
    not counted; blank lines and comments neither."""
    too_long = {}
    for i, cell in enumerate(jupytext.read(path).cells):
        if cell.cell_type != "code" or "parameters" in cell.metadata.get("tags", []):
            continue
        imports = set()
        for node in ast.parse(cell.source).body:
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                imports.update(range(node.lineno, node.end_lineno + 1))
        lines = [
            line
            for n, line in enumerate(cell.source.splitlines(), 1)
            if n not in imports and line.strip() and not line.strip().startswith("#")
        ]
        if len(lines) > CELL_LINES:
            too_long[i] = f"{len(lines)} lines: {lines[0][:60]}"
    assert not too_long, too_long


STDERR_LINES = 0  # an executed notebook's page: no stderr at all ...
STDOUT_LINES = 120  # ... and at most this many printed lines (tables and a line per stage)


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs_in_smoke_mode(path, tmp_path):
    from paper_lib.paths import artifact_dir

    # Later notebooks read earlier ones' artifacts: produce them first when this test runs on its own.
    needs = {
        "01": artifact_dir("runs/01_train_smoke/rank1") / "final",
        "02": artifact_dir("runs/02_evaluate_smoke/full/math500.greedy.jsonl"),
        "04": artifact_dir("runs/04_interpret_smoke/activations"),
        "05": artifact_dir("runs/05_sae_smoke/sae"),
    }
    for prefix, artifact in needs.items():
        if path.stem > prefix and not artifact.exists():
            run_notebook(next(p for p in NOTEBOOKS if p.stem.startswith(prefix)), tmp_path, {"SMOKE": True}, timeout_s=900)
    executed, minutes = run_notebook(path, tmp_path, {"SMOKE": True}, timeout_s=900)
    nb = jupytext.read(executed)
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    assert not [o for o in outputs if o.get("output_type") == "error"]
    # quiet by default: library logs, warnings and progress bars go to the run's log file, return values
    # are not echoed, and what is printed fits a few screens
    streams = [o for o in outputs if o.get("output_type") == "stream"]
    stderr = "".join(o["text"] for o in streams if o["name"] == "stderr")
    stdout = "".join(o["text"] for o in streams if o["name"] == "stdout")
    assert stderr.count("\n") <= STDERR_LINES, stderr[:2000]
    assert stdout.count("\n") <= STDOUT_LINES, stdout[:2000]
    assert not [o for o in outputs if o.get("output_type") == "execute_result"], "a return value echoed on the page"
    code = [line for c in jupytext.read(path).cells if c.cell_type == "code" for line in c.source.splitlines()]
    always = sum(line.startswith("save_figure(") for line in code)  # saved unconditionally
    shown = sum("image/png" in o.get("data", {}) for o in outputs)
    if any("save_figure(" in line for line in code):
        assert shown >= max(always, 1), f"{always} figures always saved but {shown} shown in the executed notebook"
    said = [o["data"]["text/markdown"] for o in outputs if "text/markdown" in o.get("data", {})]
    if any(line.lstrip().startswith("say(") for line in code):  # what we see, written from this run's numbers
        assert said and all("What we see" in text for text in said), said
        assert "{" not in "".join(said)  # formatted, not a template
    assert minutes < 10
    pages = "".join(o["data"]["text/html"] for o in outputs if "text/html" in o.get("data", {}))
    shown = {"00": "wait_word", "02": "full fine-tune", "04": 'class="c"', "06": 'class="c"'}  # roles, words, features
    assert shown.get(path.stem[:2], "") in pages, f"{path.stem}: what the page should show is missing"
    if path.stem.startswith("01"):  # a smoke run keeps out of the full run's folder (a full run there is refused)
        assert (artifact_dir("runs/01_train_smoke/rank1") / "final").is_dir() and not artifact_dir("runs/01_train").exists()


@pytest.mark.slow
def test_notebook_03_handles_an_adapter_on_mlp_modules_only(tmp_path):
    """A variant run: an MLP-only rank-1 adapter from notebook 01 goes through notebook 03 (no attention
    ratio, no meaningless attention-only variant); notebook 01 names its folder after it (rank1_mlp)."""
    nb = {p.stem[:2]: p for p in NOTEBOOKS}
    run_notebook(
        nb["01"],
        tmp_path,
        {"SMOKE": True, "LORA_MODULES": "mlp", "TRAIN_FULL": False, "OUTPUT_DIR": "runs/01_train_mlp"},
        timeout_s=900,
    )
    executed, _ = run_notebook(
        nb["03"],
        tmp_path,
        {"SMOKE": True, "ADAPTER_RUN": "runs/01_train_mlp/rank1_mlp", "OUTPUT_DIR": "runs/03_ablate_mlp", "BACKEND": "hf"},
        timeout_s=900,
    )
    outputs = [o for c in jupytext.read(executed).cells if c.cell_type == "code" for o in c.get("outputs", [])]
    assert not [o for o in outputs if o.get("output_type") == "error"]
    printed = "".join("".join(o.get("text", "")) for o in outputs if o.get("name") == "stdout")
    assert "adapted kinds: ['mlp']" in printed and "attention_only" not in printed and "mlp_only" not in printed


@pytest.mark.slow
def test_notebook_00_builds_and_measures_organism_1_by_parameters_alone(tmp_path):
    """The first organism through the same notebook (organism 2 is the default): TASK chains, LAYERS 4,
    REBUILD True and an ORGANISM_DIR of its own build a (smoke-sized) chain organism, show its worked
    steps, and measure its latent gap; a TASK that does not match the folder's organism is refused by name."""
    nb = next(p for p in NOTEBOOKS if p.stem.startswith("00"))
    organism = tmp_path / "organism1"
    params = {
        "SMOKE": True,
        "TASK": "chains",
        "LAYERS": 4,
        "REBUILD": True,
        "ORGANISM_DIR": str(organism),
        "OUTPUT_DIR": "runs/00_org1",
    }
    executed, _ = run_notebook(nb, tmp_path / "run", params, timeout_s=900)
    outputs = [o for c in jupytext.read(executed).cells if c.cell_type == "code" for o in c.get("outputs", [])]
    assert not [o for o in outputs if o.get("output_type") == "error"]
    config = json.loads((organism / "config.json").read_text())
    assert config["task"] == "chains" and config["num_hidden_layers"] == 4 and config["pack_length"] == 0
    printed = "".join("".join(o.get("text", "")) for o in outputs if o.get("name") == "stdout")
    assert "7+2=9;9x2=8" in printed  # the chain example's worked steps
    import papermill

    with pytest.raises(papermill.PapermillExecutionError, match="holds a 'chains' organism; TASK is 'registers'"):
        run_notebook(nb, tmp_path / "again", params | {"TASK": "registers", "REBUILD": False}, timeout_s=900)


def test_run_notebooks_passes_parameters_as_papermill_does_and_a_variant_keeps_its_own_figures(tmp_path, monkeypatch):
    from paper_lib import run_notebooks

    assert run_notebooks.parse_parameters([["A", "True"], ["B", "false"], ["C", "3"], ["D", "1e-3"], ["E", "x"]]) == {
        "A": True,
        "B": "false",
        "C": 3,
        "D": 1e-3,
        "E": "x",
    }
    calls = []
    monkeypatch.setattr(
        run_notebooks,
        "run_notebook",
        lambda source, out, params, **kw: calls.append((source.stem, out, params, os.environ["PAPER_FIGURES_DIR"])) or (out, 0.1),
    )
    monkeypatch.setattr(run_notebooks, "resolve", lambda p: tmp_path / p)
    run_notebooks.main(["--only", "02", "-p", "MAX_TOKENS", "256", "--tag", "long"])
    [(stem, out, params, figures)] = calls
    assert stem == "02_evaluate_reasoning" and params == {"MAX_TOKENS": 256, "OUTPUT_DIR": "runs/variants/long/02_evaluate"}
    assert figures == str(tmp_path / "build/variants" / "long" / "figures") and out == tmp_path / "build/variants/long/notebooks"
    run_notebooks.main(["--only", "02", "-p", "OUTPUT_DIR", "runs/mine", "--tag", "long"])  # a given folder stands
    assert calls.pop()[2] == {"OUTPUT_DIR": "runs/mine"}
    assert run_notebooks.next_command("runs/variants/middle/01_train/rank1_L3-5", "runs/variants/middle/01_train") == (
        "python -m paper_lib.run_notebooks --only 02 --tag middle -p ADAPTER_RUN runs/variants/middle/01_train/rank1_L3-5 "
        "-p REUSE_FROM runs/02_evaluate"
    )
    with pytest.raises(SystemExit):
        run_notebooks.main(["--only", "02", "-p", "MAX_TOKENS", "256"])  # parameters without a tag
    for tag in ("../../figures", "/tmp/x", "..", "a/b"):  # would write figures or runs outside their folders
        with pytest.raises(SystemExit):
            run_notebooks.main(["--only", "02", "-p", "MAX_TOKENS", "256", "--tag", tag])
    # the main command writes the committed figures; `make smoke` writes its own, beside its notebooks
    monkeypatch.delenv("PAPER_FIGURES_DIR", raising=False)
    run_notebooks.main(["--only", "02"])
    run_notebooks.main(["--only", "02", "--smoke", "--out", "build/smoke"])
    assert [c[3] for c in calls[1:]] == [str(tmp_path / "figures"), str(tmp_path / "build/smoke/figures")]
    assert calls[2][2] == {"SMOKE": True}


@pytest.mark.slow
def test_a_direct_run_keeps_its_figures_and_numbers_in_its_own_folder(tmp_path, monkeypatch):
    """Outside the main command (no PAPER_FIGURES_DIR), a notebook writes figures, headline numbers and
    run.json under its OUTPUT_DIR; the committed figures/ are untouched."""
    import json

    from paper_lib.paths import artifact_dir

    committed = {p.name: p.stat().st_mtime_ns for p in (REPO_ROOT / "figures").iterdir()}
    monkeypatch.delenv("PAPER_FIGURES_DIR")
    run_notebook(
        next(p for p in NOTEBOOKS if p.stem.startswith("00")),
        tmp_path,
        {"SMOKE": True, "OUTPUT_DIR": "runs/00_variant"},
        timeout_s=900,
    )
    run = artifact_dir("runs/00_variant_smoke")
    assert (run / "figures" / "organism_latent_gap.png").is_file()
    section = json.loads((run / "figures" / "headline_numbers.json").read_text())["00_build_model_organism"]
    assert section["_run"]["parameters"]["OUTPUT_DIR"] == "runs/00_variant" and section["_run"]["parameters"]["SMOKE"]
    assert json.loads((run / "run.json").read_text())["notebook"] == "00_build_model_organism"
    assert {p.name: p.stat().st_mtime_ns for p in (REPO_ROOT / "figures").iterdir()} == committed


def test_notebook_kernels_keep_freed_memory_for_reuse_unless_told_otherwise(tmp_path, monkeypatch):
    """glibc's page-returning allocator costs a CPU kernel a third of its time: kernels start with the
    allocator's thresholds raised (a value set by the caller wins), and the caller's environment is restored."""
    import os

    import papermill

    from paper_lib import run_notebooks

    seen = []
    monkeypatch.setattr(papermill, "execute_notebook", lambda *a, **k: seen.append(dict(os.environ)))
    monkeypatch.delenv("MALLOC_TRIM_THRESHOLD_", raising=False)
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "4096")
    source = tmp_path / "00_x.py"
    source.write_text("# %%\nprint(1)\n")
    run_notebooks.run_notebook(source, tmp_path / "out")
    assert seen[0]["MALLOC_TRIM_THRESHOLD_"] == str(2**30) and seen[0]["MALLOC_MMAP_THRESHOLD_"] == "4096"
    assert "MALLOC_TRIM_THRESHOLD_" not in os.environ and os.environ["MALLOC_MMAP_THRESHOLD_"] == "4096"
