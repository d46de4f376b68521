"""Where things live. No absolute paths in code: everything hangs off the repository root.

``PAPER_DATA_DIR`` moves artifacts (large at real scale) elsewhere; ``PAPER_FIGURES_DIR`` moves figures
and ``headline_numbers.json`` (the tests use it so a smoke run never touches the committed figures).
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


def figures_dir() -> Path:
    """Where figures, their CSVs and ``headline_numbers.json`` go: ``$PAPER_FIGURES_DIR`` or ``<repo>/figures``."""
    path = resolve(os.environ.get("PAPER_FIGURES_DIR", "figures"))
    path.mkdir(parents=True, exist_ok=True)
    return path


def artifact_dir(path: str | Path) -> Path:
    """An artifact directory named by a notebook parameter: relative names live under ``data_dir()``."""
    path = Path(path).expanduser()
    return path if path.is_absolute() else data_dir() / path


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
