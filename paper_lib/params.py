"""Notebook parameters, validated before any work: each has its default's type.

papermill passes ``-p NAME VALUE`` through YAML, so ``-p OVERWRITE false`` arrives as the *string*
"false", which Python counts as true. ``check_parameters`` reads the notebook's own ``parameters`` cell
(the defaults, in ``notebooks/<section>.py``), and refuses any value whose type differs from its
default's: booleans accept only True/False, integers only integers, floats integers or floats (ints are
converted), strings only strings; choices are checked case-sensitively, with the allowed values named.
"""

from __future__ import annotations

import ast
from collections.abc import Mapping, MutableMapping, Sequence
from typing import Any

from paper_lib.config import ConfigError
from paper_lib.paths import REPO_ROOT


def notebook_defaults(section: str) -> dict[str, Any]:
    """The literal defaults of ``notebooks/<section>.py``'s parameters cell, by name."""
    import jupytext

    path = REPO_ROOT / "notebooks" / f"{section}.py"
    cells = [c for c in jupytext.read(path).cells if "parameters" in c.metadata.get("tags", [])]
    if len(cells) != 1:
        raise ValueError(f"{path} has {len(cells)} parameters cells, not one")
    defaults = {}
    for node in ast.parse(cells[0].source).body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            defaults[node.targets[0].id] = ast.literal_eval(node.value)
    return defaults


def _type_name(value: Any) -> str:
    return {bool: "a bool (True or False)", int: "an integer", float: "a number", str: "a string"}.get(
        type(value), type(value).__name__
    )


def check_value(name: str, value: Any, default: Any, choices: Sequence[Any] | None = None) -> Any:
    """``value`` if it has ``default``'s type (an int for a float default becomes a float), else a
    ``ConfigError`` naming the parameter, what it got and what it needs."""
    if isinstance(default, bool):
        ok = isinstance(value, bool)
    elif isinstance(default, int):
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif isinstance(default, float):
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if ok else value
    else:
        ok = isinstance(value, type(default))
    if not ok:
        hint = (
            " (papermill passes -p NAME false as the string 'false': write True or False)"
            if isinstance(default, bool) and isinstance(value, str)
            else ""
        )
        raise ConfigError(f"{name}: expected {_type_name(default)}, got {value!r} ({type(value).__name__}){hint}")
    if choices is not None and value not in choices:
        raise ConfigError(f"{name}: {value!r} is not one of {list(choices)}")
    return value


def check_parameters(
    namespace: MutableMapping[str, Any], section: str, choices: Mapping[str, Sequence[Any]] | None = None
) -> dict[str, Any]:
    """Validate a notebook's parameters in ``namespace`` (its ``globals()``) against the defaults of its
    parameters cell; converts ints given for floats in place. Returns the parameters by name (what a
    run's ``config.json`` records)."""
    choices = dict(choices or {})
    defaults = notebook_defaults(section)
    unknown = set(choices) - set(defaults)
    if unknown:
        raise ValueError(f"choices for unknown parameters {sorted(unknown)}")
    values = {}
    for name, default in defaults.items():
        values[name] = namespace[name] = check_value(name, namespace.get(name, default), default, choices.get(name))
    return values
