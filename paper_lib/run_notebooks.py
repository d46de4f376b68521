"""Execute the numbered notebooks headlessly with papermill: ``python -m paper_lib.run_notebooks``.

The jupytext ``.py`` files are the source of truth; each is converted in memory, executed into
``--out`` (executed copies are build outputs, never committed), and timed. A full run records each
notebook's minutes in ``headline_numbers.json``; ``--smoke`` passes ``SMOKE=True`` for a fast check.
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import re
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from paper_lib.pages import write_summary_page
from paper_lib.paths import REPO_ROOT, environment, resolve
from paper_lib.results import headline_path, record_headline

log = logging.getLogger(__name__)

NOTEBOOK_DIR = REPO_ROOT / "notebooks"
KERNEL_NAME = "paper-lib"
# glibc's allocator hands freed blocks back to the system and faults fresh pages in for the next batch; in a
# notebook kernel that was ~a third of notebook 03's CPU ablations (70 s -> 47 s once kept for reuse, as
# tcmalloc and jemalloc do by default). Allocation only: every number is the same. A value already set wins.
ALLOCATOR = {"MALLOC_MMAP_THRESHOLD_": str(32 * 2**20), "MALLOC_TRIM_THRESHOLD_": str(2**30)}


def list_notebooks(directory: Path = NOTEBOOK_DIR) -> list[Path]:
    """The numbered notebooks ``NN_verb_object.py``, in reading order."""
    return sorted(p for p in directory.glob("[0-9][0-9]_*.py"))


def kernel_name() -> str:
    """The repository's registered kernel if present (``make env`` registers it), else ``python3``."""
    from jupyter_client.kernelspec import KernelSpecManager

    return KERNEL_NAME if KERNEL_NAME in KernelSpecManager().find_kernel_specs() else "python3"


def run_notebook(
    source: Path, out_dir: Path, parameters: dict[str, Any] | None = None, timeout_s: int = 3600
) -> tuple[Path, float]:
    """Execute one jupytext notebook; returns the executed copy's path and the minutes it took."""
    import jupytext
    import papermill

    out_dir.mkdir(parents=True, exist_ok=True)
    notebook = jupytext.read(source)
    name = kernel_name()
    notebook.metadata["kernelspec"] = {"name": name, "display_name": name, "language": "python"}
    unexecuted = out_dir / f"{source.stem}.input.ipynb"
    jupytext.write(notebook, unexecuted)
    executed = out_dir / f"{source.stem}.ipynb"
    start = time.perf_counter()
    # progress bars off from the kernel's first import (logs go to the run's file), and tqdm's warning that
    # ipywidgets is absent (it is, in papermill's kernels) not printed on the page
    allocator = {k: os.environ.get(k, v) for k, v in ALLOCATOR.items()}
    with environment(TQDM_DISABLE="1", PYTHONWARNINGS="ignore:IProgress not found", **allocator):
        papermill.execute_notebook(
            str(unexecuted),
            str(executed),
            parameters=parameters or {},
            kernel_name=name,
            cwd=str(REPO_ROOT),
            execution_timeout=timeout_s,
            progress_bar=False,
        )
    unexecuted.unlink()
    return executed, (time.perf_counter() - start) / 60


def machine_description() -> str:
    """What the minutes were measured on, in a few words."""
    return f"{os.cpu_count()} CPU cores, {platform.machine()}, {os.environ.get('OMP_NUM_THREADS', 'default')} threads"


def parse_value(value: str) -> Any:
    """A ``-p`` value read as papermill's command line reads it (its ``_resolve_type``, private there):
    True/False/None, an int, a float, else the string. So "false" stays a string, and the notebook's own
    parameter check refuses it for a bool, as it would from papermill."""
    if value in ("True", "False", "None"):
        return {"True": True, "False": False, "None": None}[value]
    for kind in (int, float):
        try:
            return kind(value)
        except ValueError:
            pass
    return value


def parse_parameters(pairs: Sequence[Sequence[str]]) -> dict[str, Any]:
    """``-p NAME VALUE`` pairs as a parameters dict."""
    return {name: parse_value(value) for name, value in pairs}


def variant_output_dir(section: str, tag: str) -> str | None:
    """A tagged variant's own ``OUTPUT_DIR`` for a notebook: ``runs/variants/<tag>/<the default's name>``
    (None for a notebook without one), so a variant never writes into the default run's folders."""
    from paper_lib.params import notebook_defaults

    default = notebook_defaults(section).get("OUTPUT_DIR")
    return f"runs/variants/{tag}/{Path(default).name}" if default else None


def next_command(adapter_run: str, output_dir: str) -> str:
    """What evaluates a trained adapter next (notebook 02): a tagged variant's run (its ``OUTPUT_DIR`` under
    ``runs/variants/<tag>/``) keeps its tag and reuses the default run's base and full samples."""
    parts = Path(output_dir).parts
    tag = parts[2] if len(parts) > 2 and parts[:2] == ("runs", "variants") else "<TAG>"
    return f"python -m paper_lib.run_notebooks --only 02 --tag {tag} -p ADAPTER_RUN {adapter_run} -p REUSE_FROM runs/02_evaluate"


def run_all(
    out_dir: Path, smoke: bool = False, only: Sequence[str] = (), parameters: dict[str, Any] | None = None, tag: str = ""
) -> dict[str, float]:
    """Run every notebook (or those whose name starts with one of ``only``); returns minutes per notebook.
    ``parameters`` go to every notebook run (each notebook checks those it has)."""
    if "PAPER_FIGURES_DIR" not in os.environ:
        # the main command writes the committed figures; a smoke run (its numbers are not results) writes
        # its figures and headline numbers beside its executed notebooks, never over the committed ones
        figures = resolve("figures") if not smoke else Path(out_dir) / "figures"
        with environment(PAPER_FIGURES_DIR=str(figures)):
            return run_all(out_dir, smoke, only, parameters)
    minutes = {}
    for source in list_notebooks():
        if only and not any(source.stem.startswith(o) for o in only):
            continue
        log.info("running %s", source.name)
        given = {**(parameters or {}), **({"SMOKE": True} if smoke else {})}
        scoped = variant_output_dir(source.stem, tag) if tag and "OUTPUT_DIR" not in given else None
        if scoped:
            given["OUTPUT_DIR"] = scoped  # the tag scopes the run's folder too
        _, took = run_notebook(source, out_dir, given or None)
        minutes[source.stem] = took
        log.info("%s took %.2f min", source.name, took)
        if not smoke and not parameters:
            record_headline(source.stem, "minutes", took, unit="min", machine=machine_description())
    if not smoke and not parameters and minutes and not only:
        record_headline("all_notebooks", "minutes", sum(minutes.values()), unit="min")
    if minutes and headline_path().is_file():
        log.info("summary page: %s", write_summary_page())  # every claim, verdict and figure, from the numbers
    return minutes


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="build/notebooks", help="folder for executed notebooks")
    parser.add_argument("--smoke", action="store_true", help="pass SMOKE=True (fast check, no headline minutes)")
    parser.add_argument("--only", nargs="*", default=(), help="notebook name prefixes, e.g. 00 01")
    parser.add_argument(
        "-p",
        "--parameter",
        nargs=2,
        action="append",
        default=[],
        metavar=("NAME", "VALUE"),
        help="a notebook parameter, as papermill's -p (repeatable)",
    )
    parser.add_argument(
        "--tag",
        default="",
        help="a variant run's name: its executed notebooks, figures and headline numbers go under "
        "build/variants/TAG instead of the committed figures/, and each notebook's OUTPUT_DIR (unless given) under "
        "data/runs/variants/TAG/",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    unmatched = [o for o in args.only if not any(source.stem.startswith(o) for source in list_notebooks())]
    if unmatched:
        parser.error(f"--only {' '.join(unmatched)} matches no notebook: give name prefixes such as 02 or 02_evaluate")
    parameters = parse_parameters(args.parameter)
    if parameters and not args.tag:
        parser.error("a run with -p parameters is a variant: name it with --tag, so it keeps its own figures")
    if args.tag and not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", args.tag):  # a path would leave build/variants
        parser.error(f"--tag {args.tag!r}: a plain name (letters, digits, . _ -), e.g. middle or rank4")
    if args.tag:
        variant = resolve("build/variants") / args.tag
        log.info("variant %s: figures and headline numbers under %s", args.tag, variant)
        with environment(PAPER_FIGURES_DIR=str(variant / "figures")):
            minutes = run_all(variant / "notebooks", smoke=args.smoke, only=args.only, parameters=parameters, tag=args.tag)
    else:
        minutes = run_all(resolve(args.out), smoke=args.smoke, only=args.only)
    for name, took in minutes.items():
        log.info("%-40s %6.2f min", name, took)
    log.info("%-40s %6.2f min", "total", sum(minutes.values()))


if __name__ == "__main__":
    main()
