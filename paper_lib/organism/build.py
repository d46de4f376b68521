"""Building the organism: its config, model, datasets in the hub schemas, pretraining, the latent-gap
measurement, and saving/loading the folder that stands in for Qwen2.5 and s1K-1.1."""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import random
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from safetensors import SafetensorError
from tqdm.auto import tqdm
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    Qwen2ForCausalLM,
    get_cosine_schedule_with_warmup,
)

from paper_lib.config import Config, require, seed_everything
from paper_lib.data import s1k_row
from paper_lib.formats import ENDOFTEXT, chat_prompt
from paper_lib.organism.registers import RegisterTask
from paper_lib.organism.task import (
    ChainTask,
    Problem,
    chat_document,
    parse_chat_answer,
    parse_textbook_answer,
    textbook_document,
    textbook_prompt,
)
from paper_lib.organism.tokenizer import build_tokenizer, chat_model

log = logging.getLogger(__name__)

# Subfolders of an organism directory, named after the hub artifacts they stand in for.
MODEL_SUBDIR = "model"
TRACES_SUBDIR = "s1K-1.1"
AIME_SUBDIR = "aime24"
MATH_SUBDIR = "math500"
GPQA_SUBDIR = "gpqa_diamond"
PROBE_SUBDIR = "probe"


class OrganismError(RuntimeError):
    """The organism folder is missing or unreadable."""


# ----------------------------------------------------------------------------------------------------
# Config


@dataclasses.dataclass(frozen=True)
class OrganismConfig(Config):
    """Everything that determines the organism; saved as ``config.json`` in its folder."""

    seed: int = 0
    task: str = "chains"  # chains (organism 1) or registers (organism 2: two registers, traces that doubt and repair)
    trace_slip: float = 0.3  # registers: share of traces that slip on a step, write "Wait" and repair it
    trace_check: float = 0.3  # registers: share of traces that re-derive a step after "Wait" and confirm it
    # model (a Qwen2ForCausalLM; ~1M parameters at 4 layers, organism 1; 2M at 8, organism 2)
    hidden_size: int = 128
    intermediate_size: int = 512
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    max_position_embeddings: int = 512
    # pretraining
    max_steps: int = 8  # longest chain in pretraining
    steps: int = 4000
    batch_size: int = 32  # rows a step
    pack_length: int = 0  # >0: each row is this many tokens of documents laid end to end; 0: one padded document a row
    lr: float = 3e-3
    warmup_steps: int = 100
    weight_decay: float = 0.01
    textbook_fraction: float = 0.5
    multiple_choice_fraction: float = 0.2
    eval_every: int = 500
    # datasets (difficulty = chain length k)
    n_traces: int = 1000
    trace_steps: tuple[int, int] = (3, 8)  # inclusive range of k in the s1K-style traces
    trace_multiple_choice_fraction: float = 0.15
    aime_steps: int = 6
    n_aime: int = 30
    math_level_steps: tuple[int, ...] = (2, 3, 4, 5, 6)  # k for MATH levels 1..5
    math_level_counts: tuple[int, ...] = (43, 90, 105, 128, 134)  # MATH-500's own level sizes (sum 500)
    gpqa_steps: tuple[int, int] = (3, 5)
    n_gpqa: int = 198
    n_probe_per_k: int = 100

    def validate(self) -> None:
        require(self.task in TASK_NAMES, "task", f"must be one of {list(TASK_NAMES)}, got {self.task!r}")
        for name in ("trace_slip", "trace_check"):
            require(0.0 <= getattr(self, name) <= 1.0, name, "must lie in [0, 1]")
        for name in (
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
            "num_key_value_heads",
            "steps",
            "batch_size",
            "max_steps",
            "n_traces",
            "n_aime",
            "n_gpqa",
            "n_probe_per_k",
            "eval_every",
        ):
            require(getattr(self, name) > 0, name, f"must be positive, got {getattr(self, name)}")
        require(
            self.hidden_size % self.num_attention_heads == 0, "num_attention_heads", f"must divide hidden_size={self.hidden_size}"
        )
        require(
            self.num_attention_heads % self.num_key_value_heads == 0,
            "num_key_value_heads",
            f"must divide num_attention_heads={self.num_attention_heads}",
        )
        require(
            0 <= self.pack_length <= self.max_position_embeddings,
            "pack_length",
            f"must lie in [0, max_position_embeddings={self.max_position_embeddings}], got {self.pack_length}",
        )
        require(self.lr > 0, "lr", f"must be positive, got {self.lr}")
        require(0 <= self.warmup_steps < self.steps, "warmup_steps", "must lie in [0, steps)")
        for name in ("textbook_fraction", "multiple_choice_fraction", "trace_multiple_choice_fraction"):
            require(0.0 <= getattr(self, name) <= 1.0, name, "must lie in [0, 1]")
        lo, hi = self.trace_steps
        require(1 <= lo <= hi <= self.max_steps, "trace_steps", f"need 1 <= lo <= hi <= max_steps, got {self.trace_steps}")
        lo, hi = self.gpqa_steps
        require(2 <= lo <= hi <= self.max_steps, "gpqa_steps", f"need 2 <= lo <= hi <= max_steps, got {self.gpqa_steps}")
        require(len(self.math_level_steps) == 5, "math_level_steps", "needs one k for each of levels 1-5")
        require(
            all(2 <= k <= self.max_steps for k in self.math_level_steps),
            "math_level_steps",
            "each k must lie in [2, max_steps] (k=1 has only 40 distinct chains)",
        )
        require(2 <= self.aime_steps <= self.max_steps, "aime_steps", "must lie in [2, max_steps]")
        require(
            len(self.math_level_counts) == 5 and min(self.math_level_counts) > 0,
            "math_level_counts",
            "needs a positive count for each of levels 1-5",
        )
        # a multiple-choice textbook document, with room to spare (a register step writes both registers)
        longest = (24 if self.task == "registers" else 12) * self.max_steps + 80
        require(
            self.max_position_embeddings >= longest,
            "max_position_embeddings",
            f"must be >= {longest} for chains of {self.max_steps} steps",
        )


# How notebook 00 builds each organism, beyond OrganismConfig's defaults (organism 1's). Organism 2 is
# deeper, and learns its longer documents only from packed rows: 8 layers fed one padded document a row
# did not learn in 2,500 steps (measured), while packed rows of 24 x 192 tokens carry ~5x the tokens a step.
TASK_PRESETS: dict[str, dict[str, Any]] = {
    "chains": {},
    "registers": {
        "num_hidden_layers": 8,
        "pack_length": 192,
        "batch_size": 24,
        "lr": 2e-3,
        "warmup_steps": 200,
        "textbook_fraction": 0.6,
    },
}
TASK_NAMES = tuple(TASK_PRESETS)


def organism_config(task: str, **overrides: Any) -> OrganismConfig:
    """The config notebook 00 builds ``task``'s organism from: its preset, then ``overrides``."""
    if task not in TASK_PRESETS:
        raise ValueError(f"unknown task {task!r}; use one of {list(TASK_PRESETS)}")
    return OrganismConfig(**{**TASK_PRESETS[task], "task": task, **overrides})


def task_for(cfg: OrganismConfig) -> ChainTask | RegisterTask:
    """The task an organism is built from (and read back with)."""
    return ChainTask() if cfg.task == "chains" else RegisterTask(slip=cfg.trace_slip, check=cfg.trace_check)


# ----------------------------------------------------------------------------------------------------
# The model


def build_model(cfg: OrganismConfig, tokenizer: PreTrainedTokenizerBase) -> Qwen2ForCausalLM:
    return chat_model(
        tokenizer,
        vocab_size=64 * math.ceil(len(tokenizer) / 64),
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_hidden_layers,
        num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_key_value_heads,
        max_position_embeddings=cfg.max_position_embeddings,
        tie_word_embeddings=True,
    )


# ----------------------------------------------------------------------------------------------------
# Datasets in the hub schemas


def trace_row(problem: Any, task: Any, rng: random.Random) -> dict[str, Any]:
    """A row in s1K-1.1's schema: the question, the task's thinking text (``rng`` draws a trace's slips and
    checks, where the task has them), the task's attempt (the answer section's text)."""
    kind = task.name.removesuffix("s")
    return s1k_row(
        problem.question,
        task.trajectory(problem, rng),
        task.attempt(problem),
        solution=problem.answer,
        cot_type="science" if problem.choices else "math",
        source_type=f"organism/{kind}_mc" if problem.choices else f"organism/{kind}",
        metadata=json.dumps(task.metadata(problem)),
    )


def aime_row(i: int, problem: Problem) -> dict[str, Any]:
    """A row in ``HuggingFaceH4/aime_2024``'s schema."""
    return {
        "id": i,
        "problem": problem.question,
        "solution": f"{problem.steps}. The answer is $\\boxed{{{problem.answer}}}$.",
        "answer": problem.answer,
        "url": "",
        "year": "organism",
    }


def math_row(i: int, level: int, problem: Problem) -> dict[str, Any]:
    """A row in ``HuggingFaceH4/MATH-500``'s schema; ``subject`` names the ops a chain uses."""
    kinds = {c for op in problem.ops for c in op if c in "+x<"}
    subject = {frozenset("+"): "Addition", frozenset("x"): "Multiplication"}.get(frozenset(kinds), "Mixed Operations")
    return {
        "problem": problem.question,
        "solution": f"{problem.steps}. The answer is $\\boxed{{{problem.answer}}}$.",
        "answer": problem.answer,
        "subject": subject,
        "level": level,
        "unique_id": f"organism/level{level}/{i}.json",
    }


def gpqa_row(i: int, problem: Problem) -> dict[str, Any]:
    """A row in ``Idavidrein/gpqa`` (gpqa_diamond)'s schema: the options live in the answer columns."""
    wrong = [c for c in problem.choices if c != problem.value]
    return {
        "Record ID": f"organism-{i}",
        "Question": problem.chain,
        "Correct Answer": str(problem.value),
        "Incorrect Answer 1": str(wrong[0]),
        "Incorrect Answer 2": str(wrong[1]),
        "Incorrect Answer 3": str(wrong[2]),
        "Explanation": problem.steps,
        "Subdomain": "organism",
        "High-level domain": "Organism",
    }


def problem_from_row(benchmark: str, row: dict[str, Any], seed: int = 0, task: Any = None) -> Any:
    """The organism problem behind a benchmark row (``task``: the organism's; default organism 1's).
    GPQA-style options are shuffled with a per-question seed, as the evaluation protocol does for the
    real GPQA-Diamond."""
    task = task or ChainTask()
    if benchmark == AIME_SUBDIR or benchmark == MATH_SUBDIR:
        return task.parse(row["problem"])
    if benchmark == GPQA_SUBDIR:
        problem = task.parse(row["Question"])
        options = [int(row["Correct Answer"])] + [int(row[f"Incorrect Answer {i}"]) for i in (1, 2, 3)]
        random.Random(f"{seed}-{row['Record ID']}").shuffle(options)
        return dataclasses.replace(problem, choices=tuple(options))
    raise ValueError(f"unknown benchmark {benchmark!r}; use {AIME_SUBDIR}, {MATH_SUBDIR} or {GPQA_SUBDIR}")


def probe_row(problem: Any) -> dict[str, Any]:
    return {
        "k": problem.k,
        "start": problem.start,
        "ops": list(problem.ops),
        "question": problem.question,
        "answer": problem.answer,
    }


def problem_from_probe(row: dict[str, Any], task: Any) -> Any:
    """A probe problem, read back from its question with the organism's task."""
    return task.parse(row["question"])


def build_datasets(cfg: OrganismConfig) -> tuple[dict[str, list[dict[str, Any]]], set[tuple[int, tuple[str, ...]]]]:
    """The benchmark, probe and trace rows, and the set of chains held out of pretraining.

    Benchmarks and probes are drawn first, from disjoint chains; traces avoid all of them.
    """
    rng = random.Random(cfg.seed + 1)
    task = task_for(cfg)
    held_out: set = set()
    aime = task.sample_distinct(rng, cfg.aime_steps, cfg.n_aime, held_out)
    math_rows = []
    for level, (k, n) in enumerate(zip(cfg.math_level_steps, cfg.math_level_counts), start=1):
        for problem in task.sample_distinct(rng, k, n, held_out):
            math_rows.append(math_row(len(math_rows), level, problem))
    gpqa = []
    lo, hi = cfg.gpqa_steps
    for i in range(cfg.n_gpqa):
        gpqa += task.sample_distinct(rng, lo + i % (hi - lo + 1), 1, held_out, multiple_choice=True)
    probe: list = []
    for k in range(1, cfg.max_steps + 1):
        every = task.all_problems(k)
        if every is not None:  # few enough to probe all of them, none held out
            probe += every
        else:  # hold out at most 1/8 of the problems of a length, so pretraining still sees most
            probe += task.sample_distinct(rng, k, min(cfg.n_probe_per_k, task.n_distinct(k) // 8), held_out)
    traces_used = set(held_out)
    traces = []
    lo, hi = cfg.trace_steps
    for i in range(cfg.n_traces):
        mc = rng.random() < cfg.trace_multiple_choice_fraction
        traces += task.sample_distinct(rng, lo + i % (hi - lo + 1), 1, traces_used, multiple_choice=mc)
    rng.shuffle(traces)
    trace_rng = random.Random(cfg.seed + 4)  # the traces' slips and checks (organism 2)
    rows = {
        AIME_SUBDIR: [aime_row(i, p) for i, p in enumerate(aime)],
        MATH_SUBDIR: math_rows,
        GPQA_SUBDIR: [gpqa_row(i, p) for i, p in enumerate(gpqa)],
        PROBE_SUBDIR: [probe_row(p) for p in probe],
        TRACES_SUBDIR: [trace_row(p, task, trace_rng) for p in traces],
    }
    return rows, held_out


# Split names of the hub datasets each folder stands in for.
SPLITS = {TRACES_SUBDIR: "train", AIME_SUBDIR: "train", MATH_SUBDIR: "test", GPQA_SUBDIR: "train", PROBE_SUBDIR: "test"}


def write_jsonl(rows: Iterable[dict[str, Any]], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as handle:
        for row in rows:
            handle.write(json.dumps(row, sort_keys=False) + "\n")
    return path


# ----------------------------------------------------------------------------------------------------
# Pretraining


def sample_pretraining_documents(
    rng: random.Random, cfg: OrganismConfig, tokenizer: PreTrainedTokenizerBase, held_out: set, n: int
) -> list[str]:
    docs, task = [], task_for(cfg)
    while len(docs) < n:
        k = rng.randint(1, cfg.max_steps)
        problem = task.sample(rng, k, rng.random() < cfg.multiple_choice_fraction)
        if problem.key in held_out:
            continue
        if rng.random() < cfg.textbook_fraction:
            docs.append(textbook_document(problem))
        else:
            docs.append(chat_document(tokenizer, problem))
    return docs


def packed_batch(
    rng: random.Random, cfg: OrganismConfig, tokenizer: PreTrainedTokenizerBase, held_out: set, stream: list[int]
) -> tuple[dict[str, torch.Tensor], list[int]]:
    """``batch_size`` rows of ``pack_length`` tokens cut from a stream of documents laid end to end (each
    ends in ``<|endoftext|>``), and the stream's unused rest. A row attends across its documents' borders,
    as in GPT-style pretraining; every token is trained on, none is padding, so a step sees several times
    the tokens of a padded batch of short documents for the same compute."""
    need = cfg.batch_size * cfg.pack_length
    while len(stream) < need:
        docs = sample_pretraining_documents(rng, cfg, tokenizer, held_out, cfg.batch_size)
        for ids in tokenizer(docs, add_special_tokens=False)["input_ids"]:
            stream.extend(ids)
    ids = torch.tensor(stream[:need]).view(cfg.batch_size, cfg.pack_length)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}, stream[need:]


def pretrain(
    model: Qwen2ForCausalLM,
    tokenizer: PreTrainedTokenizerBase,
    cfg: OrganismConfig,
    held_out: set,
    monitor: Sequence[Problem] = (),
) -> pd.DataFrame:
    """Next-token pretraining on freshly sampled documents (one padded document a row, or packed rows of
    ``pack_length`` tokens); returns the log (loss, and accuracy on ``monitor`` problems in both formats
    every ``eval_every`` steps).

    A plain loop rather than ``transformers.Trainer``: the data is an infinite synthetic stream sampled
    per step, and building the organism is scaffolding, not one of the paper's experiments (those train
    with TRL).
    """
    seed_everything(cfg.seed)
    rng = random.Random(cfg.seed + 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(0.9, 0.95), weight_decay=cfg.weight_decay)
    schedule = get_cosine_schedule_with_warmup(optimizer, cfg.warmup_steps, cfg.steps)
    tokenizer.padding_side = "right"
    rows = []
    start = time.perf_counter()
    model.train()
    stream: list[int] = []  # packed mode: tokens drawn but not yet trained on
    for step in tqdm(range(1, cfg.steps + 1), desc="pretraining", mininterval=10):
        if cfg.pack_length:
            batch, stream = packed_batch(rng, cfg, tokenizer, held_out, stream)
            labels = batch["input_ids"]
        else:
            docs = sample_pretraining_documents(rng, cfg, tokenizer, held_out, cfg.batch_size)
            batch = tokenizer(docs, padding=True, return_tensors="pt")
            labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
        loss = model(**batch, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        row: dict[str, Any] = {
            "step": step,
            "loss": loss.item(),
            "lr": schedule.get_last_lr()[0],
            "seconds": time.perf_counter() - start,
        }
        if monitor and (step % cfg.eval_every == 0 or step == cfg.steps):
            scores = score_formats(model, tokenizer, monitor)
            for fmt, acc in scores.groupby("format")["correct"].mean().items():
                row[f"acc_{fmt}"] = acc
            log.info("step %d loss %.3f %s", step, row["loss"], {k: v for k, v in row.items() if k.startswith("acc")})
            model.train()
        rows.append(row)
    model.eval()
    return pd.DataFrame(rows)


# ----------------------------------------------------------------------------------------------------
# Evaluation in both formats


@torch.no_grad()
def generate_greedy(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    max_new_tokens: int,
    batch_size: int = 128,
) -> list[str]:
    """Greedy completions (special tokens kept, so callers see ``<|im_start|>`` markers)."""
    tokenizer.padding_side = "left"
    model.eval()
    out: list[str] = []
    for i in range(0, len(prompts), batch_size):
        batch = tokenizer(list(prompts[i : i + batch_size]), return_tensors="pt", padding=True, add_special_tokens=False)
        generated = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id)
        new = generated[:, batch["input_ids"].shape[1] :]
        out += tokenizer.batch_decode(new, skip_special_tokens=False)
    return [text.replace(ENDOFTEXT, "") if text.endswith(ENDOFTEXT) else text for text in out]


def score_formats(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    problems: Sequence[Problem],
    formats: Sequence[str] = ("textbook", "chat"),
) -> pd.DataFrame:
    """Greedy accuracy of each problem in each format: one row per (problem, format)."""
    rows = []
    budget = max(p.completion_room for p in problems)
    for fmt in formats:
        if fmt == "textbook":
            prompts = [textbook_prompt(p) for p in problems]
            completions = generate_greedy(model, tokenizer, prompts, max_new_tokens=budget)
            answers = [parse_textbook_answer(c) for c in completions]
        elif fmt == "chat":
            prompts = [chat_prompt(tokenizer, p.question) for p in problems]
            # room for a think section (fine-tuned models reason before answering)
            completions = generate_greedy(model, tokenizer, prompts, max_new_tokens=budget)
            answers = [parse_chat_answer(c) for c in completions]
        else:
            raise ValueError(f"unknown format {fmt!r}; use 'textbook' or 'chat'")
        for p, c, a in zip(problems, completions, answers):
            rows.append(
                {
                    "format": fmt,
                    "k": p.k,
                    "question": p.question,
                    "gold": p.answer,
                    "completion": c,
                    "parsed_answer": a,
                    "correct": a == p.answer,
                }
            )
    return pd.DataFrame(rows)


# ----------------------------------------------------------------------------------------------------
# Build, save, load


def build_organism(cfg: OrganismConfig, out_dir: str | Path, threads: int | None = None) -> pd.DataFrame:
    """Build everything from ``cfg`` into ``out_dir``; returns the pretraining log (also saved).

    Pretraining uses ``threads`` torch threads (default: every core; the tests and CI run with one
    thread, which would double the build). Deterministic given the seed and the thread count.
    """
    out_dir = Path(out_dir)
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(threads or os.cpu_count() or 1)
    try:
        return _build_organism(cfg, out_dir)
    finally:
        torch.set_num_threads(previous_threads)


def _build_organism(cfg: OrganismConfig, out_dir: Path) -> pd.DataFrame:
    seed_everything(cfg.seed)
    rows, held_out = build_datasets(cfg)
    tokenizer = build_tokenizer()
    model = build_model(cfg, tokenizer)
    monitor_rng = random.Random(cfg.seed + 3)
    task = task_for(cfg)
    probe = [problem_from_probe(r, task) for r in rows[PROBE_SUBDIR] if r["k"] in (2, 4, cfg.aime_steps)]
    monitor = monitor_rng.sample(probe, min(96, len(probe)))
    history = pretrain(model, tokenizer, cfg, held_out, monitor)
    model_dir = out_dir / MODEL_SUBDIR
    model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    for name, subset in rows.items():
        write_jsonl(subset, out_dir / name / f"{SPLITS[name]}.jsonl")
    history.to_csv(out_dir / "pretraining_log.csv", index=False)
    cfg.save(out_dir)
    return history


def check_organism_dir(path: str | Path) -> Path:
    """Raise ``OrganismError`` naming the path and the fix unless ``path`` holds a complete organism."""
    path = Path(path)
    needed = [
        MODEL_SUBDIR + "/config.json",
        MODEL_SUBDIR + "/model.safetensors",
        MODEL_SUBDIR + "/tokenizer.json",
        "config.json",
        *(f"{name}/{split}.jsonl" for name, split in SPLITS.items()),
    ]
    missing = [n for n in needed if not (path / n).is_file()]
    if missing:
        raise OrganismError(
            f"no complete model organism at {path} (missing: {', '.join(missing)}). Rebuild it by running "
            "notebooks/00_build_model_organism.py with REBUILD=True (papermill -p REBUILD True), "
            "or restore data/organism from git."
        )
    return path


def load_model_and_tokenizer(
    model_dir: str | Path, dtype: torch.dtype = torch.float32
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a causal LM and its tokenizer by path or hub id, with a clear error if that fails."""
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
        model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=dtype)
    except (OSError, ValueError, RuntimeError, SafetensorError) as err:
        raise OrganismError(f"could not load a model from {model_dir}: {err}") from err
    model.eval()
    return model, tokenizer


def load_organism(path: str | Path) -> tuple[PreTrainedModel, PreTrainedTokenizerBase, OrganismConfig]:
    """The organism's base model, tokenizer and config, loaded by path as a hub model would be."""
    path = check_organism_dir(path)
    model, tokenizer = load_model_and_tokenizer(path / MODEL_SUBDIR)
    return model, tokenizer, OrganismConfig.load(path)


def _probe(path: Path) -> tuple[list[Any], Any]:
    """The probe problems of a checked organism folder and the task they are read with (its config's)."""
    task = task_for(OrganismConfig.load(path))
    rows = (path / PROBE_SUBDIR / f"{SPLITS[PROBE_SUBDIR]}.jsonl").read_text().splitlines()
    return [problem_from_probe(json.loads(line), task) for line in rows], task


def load_probe(path: str | Path) -> list[Any]:
    """The organism's probe problems (held out of pretraining), read with its own task."""
    return _probe(check_organism_dir(path))[0]


def heldout_traces(path: str | Path, n: int, min_k: int = 3, seed: int = 0) -> list[dict[str, Any]]:
    """``n`` traces in s1K-1.1's schema for probe problems: held out of pretraining and of the SFT traces."""
    probe, task = _probe(check_organism_dir(path))
    problems = [p for p in probe if p.k >= min_k]
    chosen = random.Random(seed).sample(problems, min(n, len(problems)))
    rng = random.Random(seed + 1)  # one stream for all: each trace draws its own slips and checks
    return [trace_row(p, task, rng) for p in chosen]
