"""Loading s1K-1.1 (or a local copy in its schema) and formatting rows exactly as s1 does.

s1's assistant turn is ``<|im_start|>think\\n{trajectory}\\n<|im_start|>answer\\n{attempt}`` with
"Answer: " prepended when the attempt does not contain it; the tokenizer's chat template wraps it (Qwen's
template adds its default system prompt). For TRL we emit the *conversational prompt-completion* form,
on which ``SFTTrainer`` computes the loss on the completion only.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from transformers import PreTrainedTokenizerBase

from paper_lib.formats import ANSWER, IM_END, THINK, chat_prompt
from paper_lib.paths import resolve

if TYPE_CHECKING:  # datasets is imported where it is used: the lent GPU boxes run paper_lib without it
    from datasets import Dataset

log = logging.getLogger(__name__)

S1K_HUB_ID = "simplescaling/s1K-1.1"
TRACE_FIELDS = ("question", "deepseek_thinking_trajectory", "deepseek_attempt")


class DataError(ValueError):
    """A dataset could not be read, or a row lacks what the recipe needs."""


def s1k_row(
    question: str,
    trajectory: str,
    attempt: str,
    solution: str = "",
    cot_type: str = "math",
    source_type: str = "",
    metadata: str = "",
) -> dict[str, Any]:
    """A row in s1K-1.1's schema (its columns in its order; the Gemini columns and grades unused here)."""
    return {
        "solution": solution,
        "question": question,
        "cot_type": cot_type,
        "source_type": source_type,
        "metadata": metadata,
        "gemini_thinking_trajectory": "",
        "gemini_attempt": "",
        "deepseek_thinking_trajectory": trajectory,
        "deepseek_attempt": attempt,
        "gemini_grade": "",
        "gemini_grade_reason": "",
        "deepseek_grade": "Yes",
        "deepseek_grade_reason": "",
    }


DATA_SUFFIXES = (".jsonl", ".json", ".parquet", ".csv", ".arrow")
_SHARD = re.compile(r"-\d{5}-of-\d{5}$")


def check_single_data_file(folder: Path) -> None:
    """Refuse a folder whose data files ``load_dataset`` would silently merge (a stray copy or backup, or
    several subsets side by side, as gpqa's four CSVs): name one file instead. Shards of one split
    (``train-00000-of-00002.parquet``) count as one file."""
    files = sorted(
        p
        for p in folder.rglob("*")
        if p.is_file() and p.suffix in DATA_SUFFIXES and not any(part.startswith(".") for part in p.relative_to(folder).parts)
    )
    groups = {(f.parent, _SHARD.sub("", f.stem)) for f in files}
    if len(groups) > 1:
        names = ", ".join(str(f.relative_to(folder)) for f in files[:6])
        raise DataError(
            f"{folder} holds several data files ({names}), which load_dataset would merge into one "
            "dataset; pass the path of the one file to use"
        )


def load_table(source: str, split: str = "train", config: str | None = None) -> Dataset:
    """A dataset by hub id, local folder, or a ``.jsonl``/``.json``/``.parquet``/``.csv`` file.

    Relative local paths are taken from the repository root; anything that is not an existing path is
    treated as a hub id (which fails cleanly offline).
    """
    from datasets import load_dataset

    local = resolve(source)
    try:
        if local.is_file():
            kind = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}.get(local.suffix)
            if kind is None:
                raise DataError(f"{source}: unsupported file type {local.suffix!r} (use jsonl, json, parquet or csv)")
            return load_dataset(kind, data_files=str(local), split="train")
        if local.is_dir():
            check_single_data_file(local)
            return load_dataset(str(local), config, split=split)
        looks_local = Path(source).suffix in (".jsonl", ".json", ".parquet", ".csv") or source.startswith((".", "/"))
        if looks_local or source.count("/") != 1:
            raise DataError(f"{source}: no such file or folder (and not a hub id of the form owner/name)")
        return load_dataset(source, config, split=split)
    except DataError:
        raise
    except Exception as err:  # datasets raises many types (FileNotFoundError, DatasetNotFoundError, ...)
        raise DataError(f"could not load dataset {source!r} (split {split!r}): {type(err).__name__}: {err}") from err


def check_fields(dataset: Dataset, fields: tuple[str, ...], source: str) -> None:
    """Every row has a non-empty string in each of ``fields``; the first bad row is named by index."""
    missing = [f for f in fields if f not in dataset.column_names]
    if missing:
        raise DataError(f"{source}: missing columns {missing}; found {dataset.column_names}")
    for field in fields:
        for i, value in enumerate(dataset[field]):
            if not isinstance(value, str) or not value.strip():
                raise DataError(f"{source}: row {i} has no {field!r} (got {value!r})")


def load_traces(source: str = S1K_HUB_ID, split: str = "train") -> Dataset:
    """s1K-1.1 (hub id by default) or a local copy in its schema, validated."""
    dataset = load_table(source, split)
    check_fields(dataset, TRACE_FIELDS, source)
    return dataset


def s1_assistant_turn(trajectory: str, attempt: str) -> str:
    """s1's assistant content: think section, then the answer section ("Answer: " added when missing)."""
    answer = attempt if "Answer:" in attempt else "Answer: " + attempt
    return f"{THINK}\n{trajectory.strip()}\n{ANSWER}\n{answer.strip()}"


def to_prompt_completion(row: dict[str, Any]) -> dict[str, Any]:
    """One s1K row as TRL's conversational prompt-completion example."""
    return {
        "prompt": [{"role": "user", "content": row["question"]}],
        "completion": [
            {"role": "assistant", "content": s1_assistant_turn(row["deepseek_thinking_trajectory"], row["deepseek_attempt"])}
        ],
    }


def format_s1_text(tokenizer: PreTrainedTokenizerBase, row: dict[str, Any]) -> str:
    """The full training text of a row, as s1 builds it with ``apply_chat_template``."""
    example = to_prompt_completion(row)
    return tokenizer.apply_chat_template(example["prompt"] + example["completion"], tokenize=False)


def build_sft_dataset(traces: Dataset, tokenizer: PreTrainedTokenizerBase, max_length: int) -> tuple[Dataset, dict[str, int]]:
    """Prompt-completion examples for TRL, and counts of rows over ``max_length`` tokens.

    Over-long rows are kept and truncated by TRL at ``max_length`` (s1's own block size), never dropped;
    how many there are is returned and logged.
    """
    examples = traces.map(to_prompt_completion, remove_columns=traces.column_names)
    lengths = [len(tokenizer(format_s1_text(tokenizer, row))["input_ids"]) for row in traces]
    stats = {
        "rows": len(lengths),
        "truncated": sum(n > max_length for n in lengths),
        "max_tokens": max(lengths),
        "total_tokens": sum(lengths),
    }
    if stats["truncated"]:
        log.warning(
            "%d of %d rows exceed max_length=%d tokens and will be truncated", stats["truncated"], stats["rows"], max_length
        )
    return examples, stats


# ----------------------------------------------------------------------------------------------------
# Teacher-forcing batches (notebooks 03 and 05 score traces position by position)


def completion_batches(
    tokenizer,
    prompts: Sequence[str],
    completions: Sequence[str],
    batch_size: int = 32,
    max_length: int = 2048,
    batch_tokens: int | None = None,
) -> list[dict[str, torch.Tensor]]:
    """Teacher-forcing batches of prompt + completion; ``score_mask`` marks the positions that predict a
    completion token (the paper scored every position; we score the completion only).

    Consecutive texts form a batch of at most ``batch_size`` texts and, with ``batch_tokens``, at most
    that many padded tokens (rows x longest row), so that batches of long traces fit in memory; order is
    kept."""
    tokenizer.padding_side = "right"
    texts = [p + c for p, c in zip(prompts, completions)]
    lengths = [min(len(tokenizer(t, add_special_tokens=False)["input_ids"]), max_length) for t in texts]
    groups, current = [], []
    for i, n in enumerate(lengths):
        longest = max([lengths[j] for j in current] + [n])
        if current and (len(current) >= batch_size or (batch_tokens and longest * (len(current) + 1) > batch_tokens)):
            groups.append(current)
            current = []
        current.append(i)
    if current:
        groups.append(current)
    out = []
    for group in groups:
        enc = tokenizer(
            [texts[i] for i in group],
            return_tensors="pt",
            padding=True,
            truncation=True,
            max_length=max_length,
            add_special_tokens=False,
        )
        score = torch.zeros_like(enc["input_ids"])
        for row, i in enumerate(group):
            start = len(tokenizer(prompts[i], add_special_tokens=False)["input_ids"])
            end = int(enc["attention_mask"][row].sum())
            score[row, max(start - 1, 0) : end - 1] = 1  # position t predicts token t+1
        out.append({**enc, "score_mask": score})
    return out


def scoring_traces(
    source: str, n: int, seed: int = 0, organism_dir: str = "data/organism", among: Sequence[int] | None = None
) -> list[dict]:
    """``n`` traces in s1K-1.1's schema to score teacher-forced: ``"organism-probe"`` = held-out organism
    traces (in no training set), else a dataset path or hub id, shuffled with ``seed``; with ``among``,
    drawn only from those row indices (e.g. the documents an SAE was not trained on)."""
    from paper_lib.organism import heldout_traces  # here, not at the top: the organism imports this module

    if source == "organism-probe":
        return heldout_traces(resolve(organism_dir), n, seed=seed)
    traces = load_traces(source)
    pool = list(range(len(traces))) if among is None else [int(i) for i in among]
    if any(i >= len(traces) for i in pool):
        raise ValueError(f"{source} has {len(traces)} rows; asked to draw among rows up to {max(pool)}")
    chosen = np.random.default_rng(seed).permutation(pool)[:n]
    return [traces[int(i)] for i in chosen]


def trace_batches(
    tokenizer, rows: Sequence[dict], batch_size: int = 32, max_length: int = 2048, batch_tokens: int | None = None
) -> list[dict[str, torch.Tensor]]:
    """``completion_batches`` of s1K rows: the chat-formatted question as prompt, s1's assistant turn (and
    end of turn) as the scored completion."""
    prompts = [chat_prompt(tokenizer, r["question"]) for r in rows]
    completions = [s1_assistant_turn(r["deepseek_thinking_trajectory"], r["deepseek_attempt"]) + IM_END for r in rows]
    return completion_batches(tokenizer, prompts, completions, batch_size, max_length, batch_tokens)
