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


def notebook_names(section: str) -> set[str]:
    """Every name the notebook's own code binds outside its parameters cell (assignments, imports, loop
    targets, definitions): its constants (``SECTION``) and imports (``LORA``) are these, not parameters."""
    import jupytext

    names: set[str] = set()
    for cell in jupytext.read(REPO_ROOT / "notebooks" / f"{section}.py").cells:
        if cell.cell_type != "code" or "parameters" in cell.metadata.get("tags", []):
            continue
        for node in ast.walk(ast.parse(cell.source)):
            if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
                names.add(node.id)
            elif isinstance(node, ast.alias):
                names.add((node.asname or node.name).split(".")[0])
            elif isinstance(node, (ast.FunctionDef, ast.ClassDef)):
                names.add(node.name)
    return names


# Ranges every notebook with such a parameter checks (inclusive bounds; None: open): a value outside is
# refused before any work, instead of failing deep in a library or being silently taken for another.
RANGES: dict[str, tuple[float | None, float | None]] = {
    "BATCH_SIZE": (1, None),
    "BATCH_TOKENS": (0, None),
    "N_TRACES": (0, None),
    "N_BOOTSTRAP": (100, None),
    "TOP_K": (1, None),
    "MAX_TOKENS": (1, None),
    "MAX_LENGTH": (2, None),
    "MAX_MODEL_LEN": (2, None),
    "ANSWER_TOKENS": (1, None),
    "SAMPLE_FRACTION": (0.0, 1.0),
    "MONO": (0.0, 1.0),
    "BROAD": (0.0, 1.0),
}


# Ranges of one notebook's parameters, where the shared rule above does not fit it.
SECTION_RANGES: dict[str, dict[str, tuple[float | None, float | None]]] = {
    "01_train_rank1_lora": {"N_HELDOUT": (1, None)},  # HELDOUT "" turns the held-out loss off, not 0 traces
    "03_ablate_adapters": {"N_TRACES": (1, None)},  # every score needs at least one trace (0 is not "all" here)
    "05_train_sae": {"HELDOUT_FRACTION": (0.01, 0.9)},  # some traces to train on, some held out
}


def check_range(name: str, value: Any, low: float | None, high: float | None) -> None:
    """A ``ConfigError`` naming the parameter when ``value`` is outside [low, high]."""
    if (low is not None and value < low) or (high is not None and value > high):
        bounds = f"at least {low}" if high is None else f"at most {high}" if low is None else f"in [{low}, {high}]"
        raise ConfigError(f"{name}: {value!r} is out of range: it must be {bounds}")


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
    namespace: MutableMapping[str, Any],
    section: str,
    choices: Mapping[str, Sequence[Any]] | None = None,
    ranges: Mapping[str, tuple[float | None, float | None]] | None = None,
) -> dict[str, Any]:
    """Validate a notebook's parameters in ``namespace`` (its ``globals()``) against the defaults of its
    parameters cell; converts ints given for floats in place. Refuses an upper-case name that is neither a
    parameter nor bound by the notebook's own code (a ``-p`` papermill injected for a parameter that does
    not exist: a typo, say), naming the closest parameter, and a value outside its range (``RANGES``, and
    ``ranges`` for this notebook). Returns the parameters by name (what a run's ``config.json`` records)."""
    import difflib

    choices = dict(choices or {})
    defaults = notebook_defaults(section)
    unknown = set(choices) - set(defaults)
    if unknown:
        raise ValueError(f"choices for unknown parameters {sorted(unknown)}")
    own = notebook_names(section)
    strays = sorted(n for n in namespace if n.isupper() and not n.startswith("_") and n not in defaults and n not in own)
    if strays:
        hints = [f"{n} (did you mean {close[0]}?)" if (close := difflib.get_close_matches(n, defaults, 1)) else n for n in strays]
        raise ConfigError(f"{section} has no parameter {', '.join(hints)}; its parameters: {', '.join(defaults)}")
    values = {}
    limits = {**RANGES, **SECTION_RANGES.get(section, {}), **(ranges or {})}
    for name, default in defaults.items():
        values[name] = namespace[name] = check_value(name, namespace.get(name, default), default, choices.get(name))
        if name in limits and isinstance(values[name], (int, float)) and not isinstance(values[name], bool):
            check_range(name, values[name], *limits[name])
    return values


MIN_ROOM = 32  # tokens a question and some thinking need beside the forced answer, at the least


def check_context_room(max_model_len: int, answer_tokens: int) -> None:
    """Refuse a context (``MAX_MODEL_LEN``) that leaves no room for a question, some thinking and the forced
    answer (``ANSWER_TOKENS``): every response would be cut, and all-zero accuracies reported as results."""
    if max_model_len < answer_tokens + MIN_ROOM:
        raise ConfigError(
            f"MAX_MODEL_LEN={max_model_len} leaves no room for a question and thinking beside ANSWER_TOKENS="
            f"{answer_tokens}: it must be at least {answer_tokens + MIN_ROOM}"
        )
