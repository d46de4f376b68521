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
    records, offset = [], 0
    for number, line in enumerate(lines, start=1):
        last = number == len(lines) or all(not rest.strip() for rest in lines[number:])
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as err:
                if not last:
                    raise ValueError(f"{path}: line {number} is not JSON ({err}); the file is corrupt") from err
                log.warning("%s: dropping a torn last line (%d bytes), left by an interrupted write", path, len(line))
                with path.open("r+b") as handle:
                    handle.truncate(offset)
                break
        offset += len(line) + 1
    return records
