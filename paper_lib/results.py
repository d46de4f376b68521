"""Headline numbers: one JSON file, one section per notebook, stable keys, each number with its unit or n."""

from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any

from paper_lib.paths import figures_dir

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
