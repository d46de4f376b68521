"""Headline numbers: one JSON file, one section per notebook, stable keys, each number with its unit or n."""

from __future__ import annotations

import json
import logging
import math
import os
import tempfile
from pathlib import Path
from typing import Any

from paper_lib.paths import figures_dir

log = logging.getLogger(__name__)

HEADLINE_FILE = "headline_numbers.json"


def headline_path() -> Path:
    return figures_dir() / HEADLINE_FILE


def load_headlines(path: Path | None = None) -> dict[str, dict[str, Any]]:
    path = path or headline_path()
    return json.loads(path.read_text()) if path.is_file() else {}


RUN_FILE = "run.json"  # beside a stage's own config.json (a TrainConfig, an SAESpec), never over it
_RUNS: dict[str, dict[str, Any]] = {}  # sections this process writes whole: {"info": ..., "written": bool}


def git_commit() -> str:
    """The repository's commit (``+dirty`` with uncommitted changes), or ``unknown`` outside a checkout."""
    import subprocess

    from paper_lib.paths import REPO_ROOT

    try:
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True, check=True
        ).stdout.strip()
        # changed code, not the figures a run is writing (the main command rewrites the committed ones)
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no", "--", ".", ":!figures"],
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return sha + ("+dirty" if dirty else "")


def start_run(section: str, out_dir: str | Path, parameters: dict[str, Any]) -> Path:
    """Begin a notebook run: ``out_dir/run.json`` records the notebook, its parameters and the git
    commit; figures go under ``out_dir/figures`` unless ``$PAPER_FIGURES_DIR`` says otherwise (the main
    command); the run's headline section is written whole, by this run alone, with the same record."""
    from paper_lib.paths import set_default_figures_dir

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    info = {"notebook": section, "commit": git_commit(), "parameters": parameters}
    (out_dir / RUN_FILE).write_text(json.dumps(info, indent=2, default=str) + "\n")
    set_default_figures_dir(out_dir / "figures")
    _RUNS[section] = {"info": {"commit": info["commit"], "parameters": parameters}, "written": False, "dir": out_dir}
    (out_dir / SAID_FILE).write_text(f"# What {section} saw (commit {info['commit']})\n")
    return out_dir


SAID_FILE = "what_we_see.md"


def run_info(section: str) -> dict[str, Any]:
    """The notebook, commit and parameters of this process's run of ``section`` (for pages and figures)."""
    run = _RUNS.get(section)
    return {"notebook": section, **(run["info"] if run else {"commit": git_commit(), "parameters": {}})}


def verdict(held: bool | None) -> str:
    """The words for whether a claim of the paper held on this run; None: the run cannot decide it (an
    interval too wide, or a comparison without a difference to compare)."""
    if held is None:
        return "this run **cannot decide** the paper's claim"
    return "the paper's claim **holds** here" if held else "the paper's claim **does not hold** here"


def interval_verdict(lo: float, hi: float) -> bool | None:
    """A claim that a difference is positive: held when its interval lies above zero, not held when it lies
    below, undecided when it contains zero."""
    return True if lo > 0 else False if hi < 0 else None


def say(section: str, text: str) -> str:
    """What we see, written from this run's numbers (so it stays true when a parameter changes): shown as
    markdown in the executed notebook, logged, and appended to the run's ``what_we_see.md``."""
    log.info("%s: %s", section, text)
    run = _RUNS.get(section)
    if run is not None:
        with (run["dir"] / SAID_FILE).open("a") as handle:
            handle.write("\n" + text.strip() + "\n")
    try:
        from IPython import get_ipython
        from IPython.display import Markdown, display
    except ImportError:
        return text
    shell = get_ipython()
    if shell is not None and getattr(shell, "kernel", None) is not None:
        display(Markdown(text))
    return text


def record_headline(
    section: str, key: str, value: float, *, unit: str | None = None, n: int | None = None, **extra: Any
) -> dict[str, Any]:
    """Store ``value`` under ``section.key``; at least one of ``unit`` and ``n`` is required.

    The file is rewritten atomically so that an interrupted run never leaves half a JSON file.
    """
    if unit is None and n is None:
        raise ValueError(f"{section}.{key}: give a unit or an n")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{section}.{key}: value {value} is not finite")
    entry: dict[str, Any] = {"value": value}
    if unit is not None:
        entry["unit"] = unit
    if n is not None:
        entry["n"] = int(n)
    entry.update(extra)
    path = headline_path()
    data = load_headlines(path)
    run = _RUNS.get(section)
    if run is not None and not run["written"]:  # this run's first number: the section is this run's alone
        data[section] = {"_run": run["info"]}
        run["written"] = True
    data.setdefault(section, {})[key] = entry
    data = {s: dict(sorted(v.items())) for s, v in sorted(data.items())}
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".json")
    with os.fdopen(fd, "w") as handle:
        json.dump(data, handle, indent=2)
        handle.write("\n")
    os.replace(tmp, path)
    return entry


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """The records of an append-only JSONL file (missing file: none).

    A process killed mid-write leaves a torn last line: it is dropped with a warning and cut from the
    file, so the next append starts on a clean line and a rerun redoes just that record. A bad line
    anywhere else is real corruption and raises, naming the file and line."""
    path = Path(path)
    if not path.is_file():
        return []
    raw = path.read_bytes()
    lines = raw.split(b"\n")
    last = max((n for n, line in enumerate(lines, start=1) if line.strip()), default=0)  # the last non-blank line
    records, offset = [], 0
    for number, line in enumerate(lines, start=1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as err:
                if number != last:
                    raise ValueError(f"{path}: line {number} is not JSON ({err}); the file is corrupt") from err
                log.warning("%s: dropping a torn last line (%d bytes), left by an interrupted write", path, len(line))
                with path.open("r+b") as handle:
                    handle.truncate(offset)
                break
        offset += len(line) + 1
    return records
