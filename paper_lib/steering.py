"""Steering an SAE latent on the organism (notebook 06): what each strength does to the completions, the
latent's direction against a random direction of the same norm."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from paper_lib.evaluation import GenerationSpec, Item, evaluate
from paper_lib.formats import chat_prompt
from paper_lib.organism import STEP_ROLES, token_roles


def steering_table(
    engine: Any, items: Sequence[Item], spec: GenerationSpec, out_dir: Path, steer: int, role: str, organism: str
) -> pd.DataFrame:
    """Every transform of ``engine`` (``x<s>``: the latent at strength s; ``random_x<s>``: the control) on
    ``items``: the rate of the latent's ``role`` among the generated tokens, the thinking steps (counted only
    in responses that parse as a trace; ``parsed`` of ``n``), the accuracy and the first response."""
    tokenizer = engine.tokenizer
    rows = []
    for variant in engine.transforms:
        df = evaluate(engine, items, spec, Path(out_dir) / f"latent{steer}_{variant}.jsonl", variant=variant)
        rates, steps = [], []
        for item, response in zip(items, df.response):
            prompt = chat_prompt(tokenizer, item.question)
            generated = token_roles(tokenizer, prompt + response)[len(tokenizer(prompt, add_special_tokens=False)["input_ids"]) :]
            rates.append(np.mean([r == role for r in generated]) if generated else 0.0)
            if generated and "other" not in generated:  # steps counted only in text that parses as a trace
                steps.append(sum(r == STEP_ROLES[organism] for r in generated))
        rows.append(
            {
                "direction": "random" if variant.startswith("random") else "latent",
                "strength": variant.removeprefix("random_"),
                "role_rate": float(np.mean(rates)),
                "steps": float(np.mean(steps)) if steps else float("nan"),
                "parsed": len(steps),
                "accuracy": float(df.correct.mean()),
                "n": len(df),
                "example": df.response.iloc[0],
            }
        )
    return pd.DataFrame(rows)


def steering_sentence(steer: int, role: str, steering: pd.DataFrame) -> str:
    """Notebook 06's "what we see (steering)": the latent at its largest and smallest strengths against the
    control, from ``steering_table`` (strengths start at 0 and rise, so every row it reads exists)."""
    from paper_lib.results import steering_steps_sentence

    latent, control = steering[steering.direction == "latent"], steering[steering.direction == "random"]
    first, last, rand, small = latent.iloc[0], latent.iloc[-1], control.iloc[-1], latent.iloc[1]
    return (
        f"**What we see (steering).** Latent {steer} (best role {role}) at {last.strength}: its role's rate "
        f"{first.role_rate:.2f} -> {last.role_rate:.2f}, thinking steps {first.steps:.1f} -> {last.steps:.1f} (in the "
        f"{first.parsed} -> {last.parsed} of {int(last.n)} responses that parse as a trace), accuracy "
        f"{first.accuracy:.2f} -> {last.accuracy:.2f}; a random direction of the same norm at the same strength: "
        f"{rand.role_rate:.2f}, {rand.steps:.1f} steps ({rand.parsed} parse), accuracy {rand.accuracy:.2f}. "
        f"At the smallest strength, {small.strength}: the latent leaves {small.steps:.1f} thinking steps and accuracy "
        f"{small.accuracy:.2f}, the control {control.iloc[0].steps:.1f} and {control.iloc[0].accuracy:.2f}. "
        f"Beyond the control, the latent changes its role's rate by {(last.role_rate - rand.role_rate):+.2f}; "
        + steering_steps_sentence(first.steps, last.steps, rand.steps, rand.parsed)
    )


def record_steering(section: str, steering: pd.DataFrame, steer: int, role: str) -> None:
    """Headline numbers: the change from no steering to the largest strength of the role's rate, the thinking
    steps (over responses that parse as a trace) and the accuracy, for the latent and for the equal-norm
    random direction at the same strength (the control); a measure with no parsed response at one end is
    left out."""
    from paper_lib.results import record_headline

    latent, control = steering[steering.direction == "latent"], steering[steering.direction == "random"]
    first, last, rand = latent.iloc[0], latent.iloc[-1], control.iloc[-1]
    for key, column, measure in (
        ("steering_role_rate_change", "role_rate", "fraction of generated tokens"),
        ("steering_steps_change", "steps", "thinking steps per response"),
        ("steering_accuracy_change", "accuracy", "fraction"),
    ):
        extra = {"role": role} if column == "role_rate" else {}
        change = last[column] - first[column]
        if not (np.isfinite(change) and np.isfinite(rand[column] - first[column])):
            continue  # no response parsed as a trace at one end: no step count to compare
        record_headline(
            section, key, change, unit=measure, n=int(last.n), latent=steer, **extra, strength=last.strength, before=first[column]
        )
        record_headline(
            section,
            key.replace("steering_", "steering_random_"),
            rand[column] - first[column],
            unit=measure,
            n=int(rand.n),
            strength=rand.strength,
            before=first[column],
        )
