"""Typed, validated configs and seeding.

Every config is a frozen dataclass whose ``__post_init__`` checks its fields, so an impossible value
fails at construction with the field's name, not deep inside a library. ``to_dict``/``from_dict`` give
the ``config.json`` written beside every artifact.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch

C = TypeVar("C", bound="Config")


class ConfigError(ValueError):
    """A config field holds an impossible value."""


def require(condition: bool, field: str, message: str) -> None:
    """Raise ``ConfigError`` naming ``field`` unless ``condition`` holds."""
    if not condition:
        raise ConfigError(f"{field}: {message}")


@dataclasses.dataclass(frozen=True)
class Config:
    """Base class: JSON round trip and a ``validate`` hook run at construction."""

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:  # overridden by subclasses
        pass

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls: type[C], data: dict[str, Any]) -> C:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - names
        if unknown:
            raise ConfigError(f"{cls.__name__}: unknown fields {sorted(unknown)}")
        kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in data.items()}
        return cls(**kwargs)

    def save(self, directory: str | Path) -> Path:
        """Write ``config.json`` into ``directory`` (created if missing)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / "config.json"
        path.write_text(json.dumps({"class": type(self).__name__, **self.to_dict()}, indent=2) + "\n")
        return path

    @classmethod
    def load(cls: type[C], directory: str | Path) -> C:
        path = Path(directory) / "config.json"
        if not path.is_file():
            raise FileNotFoundError(f"no config.json in {directory}")
        data = json.loads(path.read_text())
        data.pop("class", None)
        return cls.from_dict(data)


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (CPU and CUDA) for a reproducible run."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    os.environ.setdefault("PYTHONHASHSEED", str(seed))


def fingerprint(value: Any) -> str:
    """A short content hash of any JSON-able value (texts, items, settings): what an artifact records about
    its inputs, so that a rerun with other inputs is refused instead of silently reusing it."""
    import hashlib

    return hashlib.sha256(json.dumps(value, sort_keys=True, default=_whole).encode()).hexdigest()[:16]


def _whole(value: Any) -> Any:
    """A value json cannot write, as all of its content: arrays and columns (a ``datasets`` column's repr
    shows five rows) as lists, sets sorted, paths as text; only what has no content beyond its name (a
    dtype) falls back to ``str``."""
    from collections.abc import Iterable
    from pathlib import PurePath

    if isinstance(value, PurePath):
        return str(value)
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, (set, frozenset)):
        return sorted(value, key=repr)
    if isinstance(value, Iterable) and not isinstance(value, (str, bytes)):
        return list(value)
    return str(value)


def differences(old: dict[str, Any], new: dict[str, Any], ignore: tuple[str, ...] = ()) -> dict[str, tuple[Any, Any]]:
    """``{key: (old, new)}`` for every key whose value differs (missing counts as None)."""
    keys = (set(old) | set(new)) - set(ignore)
    return {k: (old.get(k), new.get(k)) for k in sorted(keys) if old.get(k) != new.get(k)}


def describe_differences(diff: dict[str, tuple[Any, Any]]) -> str:
    return "; ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in diff.items())
