"""Where things live. No absolute paths in code: everything hangs off the repository root.

``PAPER_DATA_DIR`` moves artifacts (large at real scale) elsewhere; ``PAPER_FIGURES_DIR`` says where figures
and ``headline_numbers.json`` go (the main command: the committed ``figures/``; the tests: a temporary
folder); without it a notebook writes them under its own output folder.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent


def resolve(path: str | Path) -> Path:
    """A path as given if absolute, else relative to the repository root (not the process's cwd)."""
    path = Path(path).expanduser()
    return path if path.is_absolute() else REPO_ROOT / path


def data_dir() -> Path:
    """Root of all artifacts: ``$PAPER_DATA_DIR`` or ``<repo>/data``."""
    return resolve(os.environ.get("PAPER_DATA_DIR", "data"))


_figures_default: Path | None = None


def set_default_figures_dir(path: str | Path | None) -> None:
    """Where figures go when ``$PAPER_FIGURES_DIR`` is unset (a notebook run: its own output folder)."""
    global _figures_default
    _figures_default = None if path is None else Path(path)


def figures_dir() -> Path:
    """Where figures, their CSVs and ``headline_numbers.json`` go: ``$PAPER_FIGURES_DIR`` (the main command
    sets it to ``<repo>/figures``; the tests to a temporary folder), else the running notebook's own
    ``<OUTPUT_DIR>/figures`` (``results.start_run``), else ``<repo>/figures``."""
    if "PAPER_FIGURES_DIR" in os.environ:
        path = resolve(os.environ["PAPER_FIGURES_DIR"])
    else:
        path = _figures_default or resolve("figures")
    path.mkdir(parents=True, exist_ok=True)
    return path


def artifact_dir(path: str | Path) -> Path:
    """An artifact directory named by a notebook parameter: relative names live under ``data_dir()``."""
    path = Path(path).expanduser()
    return path if path.is_absolute() else data_dir() / path


def run_name(output_dir: str, smoke: bool = False) -> str:
    """A stage's folder name from its ``OUTPUT_DIR`` parameter: a smoke run gets ``_smoke`` appended, so it
    never clashes with (or is reused as) a full run, and a smoke run downstream finds its upstream's."""
    return f"{output_dir}_smoke" if smoke else output_dir


def train_run_name(run: str, smoke: bool = False) -> str:
    """Notebook 01's run folder ``<its OUTPUT_DIR>/<label>`` (an ``ADAPTER_RUN``), as a smoke run of notebook 01
    named it: ``runs/01_train/rank1`` -> ``runs/01_train_smoke/rank1``, so smoke pairs with smoke downstream."""
    if not smoke:
        return run
    path = Path(run)
    return str(Path(run_name(str(path.parent), smoke)) / path.name)


def stage_dir(output_dir: str, smoke: bool = False) -> Path:
    """``artifact_dir`` of ``run_name``: where a stage's run (smoke or not) keeps its artifacts."""
    return artifact_dir(run_name(output_dir, smoke))


@contextmanager
def environment(**variables: str) -> Iterator[None]:
    """Set environment variables for the duration (notebook kernels started inside inherit them)."""
    saved = {k: os.environ.get(k) for k in variables}
    os.environ.update(variables)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
