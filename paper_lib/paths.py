"""Where things live. No absolute paths in code: everything hangs off the repository root.

``PAPER_DATA_DIR`` moves artifacts (large at real scale) elsewhere; ``PAPER_FIGURES_DIR`` says where figures
and ``headline_numbers.json`` go (the main command: the committed ``figures/``; the tests: a temporary
folder); without it a notebook writes them under its own output folder.
"""

from __future__ import annotations

import os
import tempfile
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
    if path.exists() and not path.is_dir():
        raise NotADirectoryError(
            f"{path} is a file, where figures and headline numbers go: move it away (or set PAPER_FIGURES_DIR)"
        )
    path.mkdir(parents=True, exist_ok=True)
    return path


@contextmanager
def explained_disk_errors(path: str | Path) -> Iterator[None]:
    """Turn a full disk (or quota) while writing under ``path`` into an error that says which folder and what
    to do; every stage resumes from what it wrote completely."""
    import errno

    try:
        yield
    except OSError as err:
        if err.errno in (errno.ENOSPC, errno.EDQUOT):
            raise OSError(
                err.errno,
                f"no space left while writing under {path} ({err}): free space there (df -h {Path(path).parent}), "
                "or move the artifacts with PAPER_DATA_DIR, and rerun: the run resumes from what it wrote completely",
            ) from err
        raise


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


class RunDirError(ValueError):
    """A run folder parameter that names no run folder of its own (empty, the data folder, outside it)."""


def check_run_name(output_dir: str, parameter: str = "OUTPUT_DIR") -> None:
    """Refuse a run folder name that is empty, absolute, climbs out (``..``), or names the data folder
    itself or the organism: a run's folder is a named folder under the data folder, so that nothing a run
    deletes or overwrites can be anything else."""
    text = str(output_dir).strip()
    parts = Path(text).parts
    why = (
        "is empty"
        if not text or text in (".", "./")
        else "is absolute"
        if Path(text).is_absolute()
        else "climbs out of the data folder (..)"
        if ".." in parts
        else "is the organism's folder"
        if parts and parts[0] == "organism"
        else None
    )
    if why:
        raise RunDirError(
            f"{parameter}={output_dir!r} {why}: name a run folder under the data folder ({data_dir()}), e.g. 'runs/my_run'"
        )


def stage_dir(output_dir: str, smoke: bool = False, parameter: str = "OUTPUT_DIR") -> Path:
    """``artifact_dir`` of ``run_name``: where a stage's run (smoke or not) keeps its artifacts; the name is
    checked first (``check_run_name``)."""
    check_run_name(output_dir, parameter)
    return artifact_dir(run_name(output_dir, smoke))


RUN_MARKER = "run.json"  # what results.start_run writes into every run folder


def clear_run_dir(path: str | Path, section: str) -> None:
    """Delete a run folder (``OVERWRITE True``) of notebook ``section``, only when it is one: strictly inside
    the data folder, marked by its own ``run.json`` naming ``section`` as the notebook that made it, and
    holding no other run's folder and no model or adapter weights. Anything else (another notebook's run,
    say notebook 01's trained models given as notebook 02's ``OUTPUT_DIR``) is refused, naming the folder,
    and nothing is deleted."""
    import json
    import shutil

    path, root = Path(path).resolve(), data_dir().resolve()
    if not path.exists():
        return
    marker = path / RUN_MARKER
    problem = (
        "is not inside the data folder"
        if root not in path.parents
        else f"has no {RUN_MARKER} (not a folder a run made)"
        if not marker.is_file()
        else f"was made by {json.loads(marker.read_text()).get('notebook')!r}, not {section!r}"
        if json.loads(marker.read_text()).get("notebook") != section
        else "holds another run's folder"
        if any(p.parent != path for p in path.rglob(RUN_MARKER))
        else "holds model or adapter weights"
        if any(path.rglob("*.safetensors"))
        else None
    )
    if problem:
        raise RunDirError(f"OVERWRITE: refusing to delete {path}: it {problem}; delete it by hand if you mean to")
    shutil.rmtree(path)


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


def write_text_atomically(path: Path, text: str) -> None:
    """``text`` to ``path`` whole or not at all (a temporary file beside it, then a rename): neither a process
    killed while writing nor another writing the same file at once leaves a torn one."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as handle:
            handle.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
