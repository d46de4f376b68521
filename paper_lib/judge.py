"""An LLM judge for real-scale interpretability: explain a feature, then score the explanation by detection.

Any OpenAI-compatible endpoint works (a local ``vllm serve``, or an API), named by ``JudgeConfig``; the
key is read from the environment variable ``api_key_env`` (never from a file or a parameter value).
The official ``openai`` client does the HTTP, retries (429, 5xx, connection errors, with backoff) and
timeouts; this module adds the prompts, the parsing, an on-disk cache of every answer (a rerun asks
nothing twice) and per-feature result files that keep finished scores when a later call fails.

Protocol (after EleutherAI's delphi and the paper's autointerp): the explainer sees a feature's top
examples, each with its activating token marked ``<<...>>`` and the activation scaled 0-10, and writes
an explanation of at most ten words. The detection scorer then sees, one at a time, activating contexts
(held-out top examples) and non-activating contexts (random tokens where the feature is <= 0), each
with one marked token, and answers yes or no; accuracy and F1 on that balanced set score the
explanation. An unparseable answer counts as wrong and is recorded as such.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import re
import threading
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from paper_lib.config import Config, require
from paper_lib.results import progress_enabled, read_jsonl

log = logging.getLogger(__name__)


PROMPT_VERSION = 2  # bump when a prompt changes: records judged with the old prompts are then asked again


class JudgeError(RuntimeError):
    """The judge endpoint could not be reached or answered with an error."""


@dataclasses.dataclass(frozen=True)
class JudgeConfig(Config):
    """Where the judge lives and how it is asked."""

    base_url: str  # e.g. http://127.0.0.1:8000/v1 (vllm serve) or https://api.openai.com/v1
    model: str
    api_key_env: str = "OPENAI_API_KEY"  # the key's environment variable; local servers need none
    max_retries: int = 3
    timeout_s: float = 60.0
    temperature: float | None = 0.0  # None: not sent (reasoning models refuse a temperature)
    max_tokens: int | None = 48  # None: not sent; reasoning models think first and need thousands
    token_param: str = "max_tokens"  # or "max_completion_tokens" (OpenAI's reasoning models refuse max_tokens)
    concurrency: int = 8  # requests in flight at once

    def validate(self) -> None:
        require(self.base_url.startswith(("http://", "https://")), "base_url", f"not an http(s) URL: {self.base_url!r}")
        require(bool(self.model), "model", "must name the judge model")
        require(self.max_retries >= 0, "max_retries", "must be >= 0")
        require(self.timeout_s > 0, "timeout_s", "must be > 0")
        require(
            self.token_param in ("max_tokens", "max_completion_tokens"),
            "token_param",
            f"must be 'max_tokens' or 'max_completion_tokens', got {self.token_param!r}",
        )
        require(self.max_tokens is None or self.max_tokens > 0, "max_tokens", "must be positive (or None: not sent)")
        require(self.concurrency >= 1, "concurrency", "must be >= 1")

    def request_parameters(self) -> dict[str, Any]:
        """The sampling parameters sent with every request (those set to None are left out)."""
        params: dict[str, Any] = {}
        if self.temperature is not None:
            params["temperature"] = self.temperature
        if self.max_tokens is not None:
            params[self.token_param] = self.max_tokens
        return params


def strip_reasoning(text: str) -> str:
    """A reasoning model's answer without its thinking: a vLLM server started without a reasoning parser
    returns ``<think>...</think>`` inside ``content``, which would otherwise become the explanation (or the
    yes/no) parsed from it. An unclosed think section leaves no answer."""
    if "</think>" in text:
        text = text.rsplit("</think>", 1)[1]
    elif "<think>" in text:
        text = text.split("<think>", 1)[0]
    return text.strip()


def judge_config_from(parameters: dict[str, Any]) -> JudgeConfig | None:
    """A notebook's judge settings from its checked parameters (``JUDGE_URL``, ``JUDGE_MODEL``,
    ``JUDGE_KEY_ENV``, ``JUDGE_MAX_TOKENS`` (0: not sent), ``JUDGE_TOKEN_PARAM``, ``JUDGE_TEMPERATURE``
    (-1: not sent), ``JUDGE_CONCURRENCY``, ``JUDGE_TIMEOUT``), validated at once; None when no ``JUDGE_URL`` is set."""
    if not parameters["JUDGE_URL"]:
        return None
    temperature = parameters["JUDGE_TEMPERATURE"]
    return JudgeConfig(
        parameters["JUDGE_URL"],
        parameters["JUDGE_MODEL"],
        api_key_env=parameters["JUDGE_KEY_ENV"],
        max_tokens=parameters["JUDGE_MAX_TOKENS"] or None,
        token_param=parameters["JUDGE_TOKEN_PARAM"],
        temperature=None if temperature < 0 else temperature,
        concurrency=parameters["JUDGE_CONCURRENCY"],
        timeout_s=parameters["JUDGE_TIMEOUT"],
    )


class Judge:
    """Chat completions with an answer cache (JSONL, one line per distinct request)."""

    def __init__(self, cfg: JudgeConfig, cache_path: str | Path) -> None:
        from openai import OpenAI

        self.cfg = cfg
        self.client = OpenAI(
            base_url=cfg.base_url,
            api_key=os.environ.get(cfg.api_key_env) or "EMPTY",
            max_retries=cfg.max_retries,
            timeout=cfg.timeout_s,
        )
        self.cache_path = Path(cache_path)
        self.cache_path.parent.mkdir(parents=True, exist_ok=True)
        self.cache: dict[str, str] = {}
        for entry in read_jsonl(self.cache_path):
            self.cache[entry["key"]] = entry["answer"]
        self.requests = 0  # answers fetched from the endpoint (not from the cache)
        self._lock = threading.Lock()

    def identity(self) -> str:
        """What a judged record was judged by: the endpoint, model, sampling settings and prompt version."""
        from paper_lib.config import fingerprint

        cfg = self.cfg
        return fingerprint([cfg.base_url, cfg.model, cfg.temperature, cfg.max_tokens, cfg.token_param, PROMPT_VERSION])

    def ask(self, prompt: str) -> str:
        import openai

        params = self.cfg.request_parameters()
        key = hashlib.sha256(
            json.dumps([self.cfg.base_url, self.cfg.model, prompt, self.cfg.temperature, self.cfg.max_tokens]).encode()
        ).hexdigest()
        if key in self.cache:
            return self.cache[key]
        try:
            response = self.client.chat.completions.create(
                model=self.cfg.model, messages=[{"role": "user", "content": prompt}], **params
            )
        except openai.APIStatusError as err:
            raise JudgeError(f"judge at {self.cfg.base_url} answered HTTP {err.status_code}: {err.message}") from err
        except openai.APIConnectionError as err:  # includes timeouts
            raise JudgeError(f"cannot reach the judge at {self.cfg.base_url}: {err}") from err
        except (openai.APIResponseValidationError, json.JSONDecodeError) as err:
            raise JudgeError(f"the judge at {self.cfg.base_url} sent a reply that is not a chat completion: {err}") from err
        try:
            answer = strip_reasoning(response.choices[0].message.content or "")
        except (IndexError, AttributeError, TypeError) as err:
            raise JudgeError(
                f"the judge at {self.cfg.base_url} sent a malformed chat completion ({err}): {str(response)[:200]}"
            ) from err
        with self._lock:  # requests run in parallel threads (score_features); the cache file is shared
            self.requests += 1
            self.cache[key] = answer
            with self.cache_path.open("a") as handle:
                handle.write(json.dumps({"key": key, "prompt": prompt, "answer": answer}) + "\n")
        return answer


@contextmanager
def local_judge_server(
    model: str,
    served_name: str = "judge",
    dtype: str = "auto",
    max_model_len: int = 4096,
    log_path: str | Path | None = None,
    startup_s: float = 600.0,
    extra_args: Sequence[str] = (),
) -> Iterator[str]:
    """vLLM's OpenAI-compatible server for ``model`` on a free loopback port, for as long as the context
    lasts; yields its ``/v1`` URL once it answers. The same server a researcher starts with ``vllm serve``
    (``extra_args``: e.g. ``--tensor-parallel-size 4``); its output goes to ``log_path``."""
    import socket
    import subprocess
    import sys
    import time
    import urllib.request

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    url = f"http://127.0.0.1:{port}/v1"
    log_file = Path(log_path) if log_path else Path(os.devnull)
    with log_file.open("w") as out:
        server = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "vllm.entrypoints.openai.api_server",
                "--model",
                str(model),
                "--served-model-name",
                served_name,
                "--dtype",
                dtype,
                "--max-model-len",
                str(max_model_len),
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                *extra_args,
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
        try:
            deadline = time.monotonic() + startup_s
            while True:
                try:
                    with urllib.request.urlopen(f"{url}/models", timeout=5):
                        break
                except OSError:
                    if server.poll() is not None or time.monotonic() > deadline:
                        raise JudgeError(
                            f"the local judge server for {model} did not start (exit code {server.poll()}); see {log_file}"
                        ) from None
                    time.sleep(2)
            log.info("judge server for %s at %s", model, url)
            yield url
        finally:
            server.terminate()
            try:
                server.wait(timeout=60)
            except subprocess.TimeoutExpired:
                server.kill()


def format_example(tokens: list[str], values: list[float], center: int, scale: float | None = None) -> str:
    """One context as text with the centre token marked ``<<...>>``; with ``scale``, prefixed by the
    centre's activation on a 0-10 scale."""
    text = "".join(f"<<{t}>>" if i == center else t for i, t in enumerate(tokens)).replace("\n", "\\n")
    if scale is None:
        return text
    level = int(round(10 * max(0.0, values[center]) / scale)) if scale > 0 else 0
    return f"({level}) {text}"


def explanation_prompt(examples: list[dict[str, Any]]) -> str:
    scale = max(e["values"][e["center"]] for e in examples)
    lines = "\n".join(format_example(e["tokens"], e["values"], e["center"], scale) for e in examples)
    return (
        "We study one feature of a language model. Below are text excerpts where it activates strongly. In each, "
        "the token it activates on is marked <<like this>>, and the number in parentheses is its activation "
        f"(0-10).\n\n{lines}\n\nIn at most 10 words, what does this feature detect? Reply with the explanation only."
    )


def parse_explanation(answer: str) -> str:
    """The first non-empty line, unquoted, cut to ten words ("" when there is none)."""
    line = next((s.strip() for s in answer.splitlines() if s.strip()), "")
    line = re.sub(r"^(explanation|answer)\s*:\s*", "", line, flags=re.I).strip("\"'` ")
    return " ".join(line.split()[:10])


def detection_prompt(explanation: str, example: dict[str, Any]) -> str:
    return (
        f'A feature of a language model is explained as: "{explanation}".\nHere is a text excerpt with one token '
        f"marked <<like this>>:\n{format_example(example['tokens'], example['values'], example['center'])}\n"
        "Does the feature activate on the marked token? Answer yes or no."
    )


def parse_yes_no(answer: str) -> bool | None:
    match = re.search(r"\b(yes|no)\b", answer, flags=re.I)
    return None if match is None else match.group(1).lower() == "yes"


def non_activating_examples(
    features: Any, feature: int, tokens: Any, decode: Any, n: int, width: int, seed: int = 0, max_draws: int = 10_000
) -> list[dict[str, Any]]:
    """``n`` contexts centred on distinct random tokens where feature ``feature`` of ``features`` is <= 0
    (``interp.Features``; ``tokens``: an ``ActivationStore``). Drawn token by token (at most
    ``max_draws``), so nothing of size [tokens] is built; fewer than ``n`` if the feature rarely rests."""
    from paper_lib.interp import context_example

    rng = np.random.default_rng(seed)
    total = tokens.n_tokens
    seen: set[int] = set()
    examples = []
    for index in rng.integers(0, total, size=min(max_draws, 4 * total)) if total else []:
        if len(examples) == n or len(seen) == total:
            break
        index = int(index)
        if index in seen:
            continue
        seen.add(index)
        if features.rows(index, index + 1)[0, feature] <= 0:
            examples.append(context_example(features, tokens, decode, feature, index, width))
    return examples


def similar_context_examples(
    features: Any,
    feature: int,
    tokens: Any,
    decode: Any,
    token_ids: set[int],
    n: int,
    width: int,
    seed: int = 0,
    max_draws: int = 50_000,
) -> list[dict[str, Any]]:
    """Hard negatives (delphi's similar-context negatives): ``n`` contexts centred on tokens with one of the
    ``token_ids`` the feature's top examples sit on, where the feature is <= 0. An explanation that only
    names the token says yes to these too, so detection on them is at chance for it. Drawn token by token
    (at most ``max_draws``); fewer than ``n`` where those tokens rarely occur without the feature."""
    from paper_lib.interp import context_example

    rng = np.random.default_rng(seed + 1)
    total, seen, examples = tokens.n_tokens, set(), []
    for index in rng.integers(0, total, size=min(max_draws, 20 * total)) if total and token_ids else []:
        index = int(index)
        if len(examples) == n:
            break
        if index in seen:
            continue
        seen.add(index)
        if int(tokens.token_ids(index, index + 1)[0]) in token_ids and features.rows(index, index + 1)[0, feature] <= 0:
            examples.append(context_example(features, tokens, decode, feature, index, width))
    return examples


def rating_prompt(examples: list[dict[str, Any]]) -> str:
    """The paper's interpretability rating of a feature from its top examples."""
    lines = "\n".join(format_example(e["tokens"], e["values"], e["center"]) for e in examples)
    return (
        "We study one feature of a language model. Below are text excerpts where it activates strongly; the token "
        f"it activates on is marked <<like this>>.\n\n{lines}\n\nRate the feature: 0 = monosemantic (one specific "
        "concept), 1 = broad but consistent (a family of related concepts), 2 = polysemantic (unrelated concepts). "
        "Reply with the number only."
    )


def parse_rating(answer: str) -> int | None:
    """The 0/1/2 rating (the last one given, after any reasoning), or None."""
    found = re.findall(r"\b([012])\b", answer)
    return int(found[-1]) if found else None


def score_feature(
    judge: Judge,
    name: str,
    explain_with: list[dict[str, Any]],
    activating: list[dict[str, Any]],
    non_activating: list[dict[str, Any]],
    rate: bool = False,
    hard_negatives: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """Explain from ``explain_with``, then detection accuracy / F1 on ``activating`` + ``non_activating``;
    with ``hard_negatives`` (``similar_context_examples``), also ``hard_accuracy`` on ``activating`` + them:
    an explanation that only names the token scores at chance there (NaN when there are none); with
    ``rate``, the paper's 0/1/2 rating from ``explain_with`` (None when unparsable). A judge failure is
    raised as a ``JudgeError`` naming the feature."""
    hard_negatives = hard_negatives or []
    try:
        explanation = parse_explanation(judge.ask(explanation_prompt(explain_with)))
        said = [parse_yes_no(judge.ask(detection_prompt(explanation, e))) for e in activating + non_activating]
        hard = [parse_yes_no(judge.ask(detection_prompt(explanation, e))) for e in hard_negatives]
        rating = parse_rating(judge.ask(rating_prompt(explain_with))) if rate else None
    except JudgeError as err:
        raise JudgeError(f"feature {name}: {err}") from err
    on_activating = said[: len(activating)]
    hard_correct = sum(s is True for s in on_activating) + sum(s is False for s in hard)
    truth = [True] * len(activating) + [False] * len(non_activating)
    tp = sum(s is True and t for s, t in zip(said, truth))
    fp = sum(s is True and not t for s, t in zip(said, truth))
    fn = sum(s is not True and t for s, t in zip(said, truth))
    correct = sum(s is not None and s == t for s, t in zip(said, truth))
    record = {
        "feature": name,
        "explanation": explanation,
        "n": len(truth),
        "unparsed": sum(s is None for s in said),
        "accuracy": correct / len(truth) if truth else float("nan"),
        "f1": 2 * tp / (2 * tp + fp + fn) if tp else 0.0,
        "hard_accuracy": hard_correct / (len(activating) + len(hard)) if hard else float("nan"),
        "n_hard": len(hard),
    }
    return {**record, "rating": rating} if rate else record


def judge_each(judge: Judge, items: list[dict[str, Any]], out_path: str | Path, work: Any) -> list[dict[str, Any]]:
    """``work(item)`` (a record with the item's ``feature`` name) for each item (a dict with ``name``),
    ``judge.cfg.concurrency`` at a time, with progress; one JSONL line per finished item, written as it
    finishes. Items already in ``out_path`` are not asked again, and a judge failure leaves every finished
    line in place (the first error is raised once the running items are done)."""
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    judge_id = judge.identity()  # records of another judge (URL, model, settings, prompts) are not this one's
    done = {r["feature"]: r for r in read_jsonl(out_path) if r.get("judge") == judge_id}
    todo = [f for f in items if f["name"] not in done]
    lock, errors = threading.Lock(), []
    with (
        ThreadPoolExecutor(max_workers=judge.cfg.concurrency) as pool,
        tqdm(
            total=len(items),
            initial=len(items) - len(todo),
            desc=out_path.stem,
            unit="feature",
            disable=not todo or not progress_enabled(),
        ) as bar,
    ):
        futures = [pool.submit(work, f) for f in todo]
        for future in as_completed(futures):
            if future.cancelled():  # stopped after an earlier failure: that JudgeError is the one to raise
                continue
            try:
                record = future.result() | {"judge": judge_id}
            except JudgeError as err:
                errors.append(err)
                for other in futures:  # stop asking: the endpoint is failing
                    other.cancel()
                continue
            with lock:
                with out_path.open("a") as handle:
                    handle.write(json.dumps(record) + "\n")
                done[record["feature"]] = record
            bar.update(1)
    if errors:
        raise errors[0]
    return [done[f["name"]] for f in items]


def score_features(
    judge: Judge, features: list[dict[str, Any]], out_path: str | Path, rate: bool = False
) -> list[dict[str, Any]]:
    """``score_feature`` for each of ``features`` (dicts with ``name``, ``explain_with``, ``activating``,
    ``non_activating``; see ``judge_requests``), concurrently and resumably (``judge_each``)."""
    return judge_each(
        judge,
        features,
        out_path,
        lambda f: score_feature(
            judge, f["name"], f["explain_with"], f["activating"], f["non_activating"], rate, f.get("hard_negatives")
        ),
    )


def judge_requests(
    features: Any,
    tokens: Any,
    decode: Any,
    top: tuple[np.ndarray, np.ndarray],
    columns: Sequence[int],
    seed: int = 0,
    width: int = 8,
) -> list[dict[str, Any]]:
    """The paper's judge inputs for ``columns`` of ``features`` (``interp.Features``; ``top`` their
    ``top_features`` with >= 15 columns; ``tokens`` an ``ActivationStore``): the top 10 examples to
    explain from, the next 5 and 5 random non-activating contexts to detect, ±``width`` tokens each.
    Features with fewer than 15 activating tokens are left out."""
    from paper_lib.interp import feature_examples

    tops = feature_examples(features, tokens, decode, top, k=15, width=width, columns=columns)
    return [
        {
            "name": t["name"],
            "explain_with": t["examples"][:10],
            "activating": t["examples"][10:15],
            "non_activating": non_activating_examples(features, int(i), tokens, decode, 5, width, seed),
            "hard_negatives": similar_context_examples(
                features, int(i), tokens, decode, {int(tokens.token_ids(j, j + 1)[0]) for j in top[1][i][:15]}, 5, width, seed
            ),
        }
        for t, i in zip(tops, columns)
        if len(t["examples"]) >= 15
    ]


# The paper's seven categories of SAE features (its LLM categoriser's label set).
PAPER_CATEGORIES = (
    "computational operations",
    "symbolic manipulation",
    "variable/value tracking",
    "reasoning flow control",
    "domain-specific patterns",
    "relational/logical operators",
    "result formulation",
)


def category_prompt(explanation: str, categories: Sequence[str] = PAPER_CATEGORIES) -> str:
    options = "\n".join(f"- {c}" for c in categories)
    return (
        f'A feature of a language model reasoning about maths and science is explained as: "{explanation}".\n'
        f"Which category fits it best?\n{options}\nReply on two lines:\ncategory: <one of the categories above>\n"
        "subcategory: <two to four words>"
    )


def parse_category(answer: str, categories: Sequence[str] = PAPER_CATEGORIES) -> tuple[str | None, str]:
    """(category or None when the answer names none of ``categories``, subcategory or "")."""
    lowered = answer.lower()
    line = next((s for s in lowered.splitlines() if s.strip().startswith("category")), lowered)
    category = next((c for c in categories if c in line), None)
    sub = next((s.split(":", 1)[1].strip() for s in answer.splitlines() if s.strip().lower().startswith("subcategory")), "")
    return category, " ".join(sub.split()[:4])


def categorise(judge: Judge, explanation: str, categories: Sequence[str] = PAPER_CATEGORIES) -> tuple[str | None, str]:
    return parse_category(judge.ask(category_prompt(explanation, categories)), categories)


def categorise_features(
    judge: Judge, explained: list[dict[str, Any]], out_path: str | Path, categories: Sequence[str] = PAPER_CATEGORIES
) -> list[dict[str, Any]]:
    """The paper's category and a subcategory for each explained feature (dicts with ``name`` and
    ``explanation``), concurrently and resumably (``judge_each``)."""

    def work(item: dict[str, Any]) -> dict[str, Any]:
        try:
            category, sub = categorise(judge, item["explanation"], categories)
        except JudgeError as err:
            raise JudgeError(f"feature {item['name']}: {err}") from err
        return {
            "feature": item["name"],
            "explanation": item["explanation"],
            "category": category or "uncategorised",
            "subcategory": sub or "-",
        }

    return judge_each(judge, explained, out_path, work)


RATINGS = {0: "monosemantic", 1: "broad", 2: "polysemantic"}  # the paper's 0/1/2 rating


def rating_shares(judged: Any) -> Any:
    """Per population, the share of judged features the judge rated monosemantic / broad / polysemantic,
    with Wilson 95% intervals; unparsed ratings count in ``n`` (and as ``unrated``), so shares are honest.
    ``judged``: ``score_features`` records (with ``rating``) and a ``population`` column."""
    import pandas as pd

    from paper_lib.statistics import wilson_interval

    rows = []
    for population, group in judged.groupby("population", sort=False):
        rated = group["rating"].map(RATINGS).fillna("unrated")
        for label in (*RATINGS.values(), "unrated"):
            k, n = int((rated == label).sum()), len(group)
            rows.append(
                {
                    "population": population,
                    "class": label,
                    "share": k / n,
                    "n": n,
                    **dict(zip(("lo", "hi"), wilson_interval(k, n))),
                }
            )
    return pd.DataFrame(rows)


def record_judge_detection(section: str, judged: Any) -> None:
    """Each population's mean detection accuracy against random resting contexts, with the accuracy against
    similar-context negatives (the same tokens, the feature at rest: chance for an explanation that only
    names the token) beside it. ``judged``: columns population, accuracy, hard_accuracy."""
    from paper_lib.interp import population_slug
    from paper_lib.results import record_headline

    for population, group in judged.groupby("population"):
        values = [v for v in group["hard_accuracy"] if v == v]  # NaN: a feature without similar-context negatives
        hard = float(np.mean(values)) if values else float("nan")
        record_headline(
            section,
            f"{population_slug(population)}_judge_detection_accuracy",
            group["accuracy"].mean(),
            unit="fraction",
            n=len(group),
            **({"hard_negative_accuracy": hard} if np.isfinite(hard) else {}),
        )


JUDGED_COLUMNS = ["feature", "explanation", "n", "unparsed", "accuracy", "hard_accuracy", "f1", "rating"]


def judge_populations(
    judge: Judge, populations: dict[str, tuple[Any, Any]], store: Any, decode: Any, n_features: int, seed: int, out_dir: Path
) -> Any:
    """Explain, detect and rate ``n_features`` features of each population (all when 0), drawn with ``seed``:
    ``populations`` maps a name to (its signed features, their top tokens). One row a feature (columns
    ``JUDGED_COLUMNS`` and population); every answer cached under ``out_dir``, each population's scores
    in ``out_dir/<slug>.jsonl``."""
    import pandas as pd

    from paper_lib.interp import population_slug

    judged = []
    for name, (signed, top) in populations.items():
        chosen = np.random.default_rng(seed).permutation(len(signed.names))[: n_features or len(signed.names)]
        requests = judge_requests(signed, store, decode, top, chosen, seed)
        scores = score_features(judge, requests, Path(out_dir) / f"{population_slug(name)}.jsonl", rate=True)
        judged.append(pd.DataFrame(scores, columns=JUDGED_COLUMNS).assign(population=name))
    return pd.concat(judged, ignore_index=True)


def record_judge_ratings(section: str, ratings: Any) -> None:
    """Each population's share of features the judge rated monosemantic / broad / polysemantic, as headline
    numbers with their Wilson intervals (``rating_shares``)."""
    from paper_lib.interp import population_slug
    from paper_lib.results import record_headline

    for _, r in ratings[ratings["class"] != "unrated"].iterrows():
        record_headline(
            section,
            f"{population_slug(r.population)}_judge_rated_{r['class']}_share",
            r.share,
            unit="fraction of judged features",
            n=r.n,
            ci95=[r.lo, r.hi],
        )


def category_shares(categories: Any) -> Any:
    """The share of judged latents in each category, with Wilson 95% intervals: columns category, count,
    lo, hi, share."""
    from paper_lib.statistics import wilson_interval

    shares = categories.groupby("category").size().rename("count").reset_index()
    shares[["lo", "hi"]] = [wilson_interval(int(c), len(categories)) for c in shares["count"]]
    shares["share"] = shares["count"] / len(categories)
    return shares


def record_category_shares(section: str, shares: Any, n: int) -> None:
    """Headline numbers: the share of the ``n`` judged latents in each category (``category_shares``)."""
    from paper_lib.results import record_headline

    for _, r in shares.iterrows():
        record_headline(
            section,
            f"judge_category_{r.category.replace('/', '_').replace(' ', '_')}_share",
            r.share,
            unit="fraction of judged latents",
            n=n,
            ci95=[r.lo, r.hi],
        )
