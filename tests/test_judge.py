"""The LLM-judge plumbing: a misbehaving loopback server (retries, errors, caching, kept results) and
vLLM's own OpenAI-compatible server serving the organism (the real end-to-end path)."""

import json
import os
import socket
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
from loopback import completion, serve

from paper_lib.config import ConfigError
from paper_lib.judge import (
    Judge,
    JudgeConfig,
    JudgeError,
    parse_explanation,
    parse_yes_no,
    score_feature,
    score_features,
)


@pytest.fixture
def fake_server():
    """A loopback endpoint whose behaviour the test sets: ``state["fail"]`` failures (HTTP 500) first,
    then answers from ``state["answer"](prompt)``; it records requests and auth headers."""
    state = {"fail": 0, "requests": 0, "auth": [], "answer": lambda prompt: "yes"}

    def respond(body, headers):
        state["requests"] += 1
        state["auth"].append(headers.get("Authorization"))
        if state["fail"] > 0:
            state["fail"] -= 1
            return 500, {"error": {"message": "boom"}}
        return 200, completion(state["answer"](body["messages"][0]["content"]))

    with serve(respond) as url:
        state["url"] = url
        yield state


EXAMPLE = {"tokens": ["3", "x", "2", "=", "6"], "values": [0.0, 0.1, 0.2, 0.0, 1.5], "center": 4}


def test_retries_then_succeeds_key_from_env_and_caches(fake_server, tmp_path, monkeypatch):
    monkeypatch.setenv("JUDGE_TEST_KEY", "sekret")
    fake_server["fail"] = 2
    judge = Judge(JudgeConfig(fake_server["url"], "m", api_key_env="JUDGE_TEST_KEY", max_retries=2), tmp_path / "cache.jsonl")
    assert judge.ask("hello") == "yes" and fake_server["requests"] == 3
    assert fake_server["auth"][-1] == "Bearer sekret"
    assert judge.ask("hello") == "yes" and fake_server["requests"] == 3  # cached
    again = Judge(JudgeConfig(fake_server["url"], "m", max_retries=0), tmp_path / "cache.jsonl")
    assert again.ask("hello") == "yes" and again.requests == 0  # the cache is on disk


def test_errors_name_the_url_and_status(fake_server, tmp_path):
    fake_server["fail"] = 10
    judge = Judge(JudgeConfig(fake_server["url"], "m", max_retries=1), tmp_path / "c.jsonl")
    with pytest.raises(JudgeError, match=rf"{fake_server['url']}.*HTTP 500"):
        judge.ask("hi")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dead = Judge(JudgeConfig(f"http://127.0.0.1:{port}/v1", "m", max_retries=0, timeout_s=5), tmp_path / "d.jsonl")
    with pytest.raises(JudgeError, match=rf"cannot reach the judge at http://127.0.0.1:{port}/v1"):
        dead.ask("hi")
    with pytest.raises(ConfigError, match="base_url"):
        JudgeConfig("localhost:8000", "m")


def test_scores_detection_and_keeps_finished_features(fake_server, tmp_path):
    # explanation "final answer digits"; says yes exactly when the marked token is <<6>>
    fake_server["answer"] = lambda p: (
        "Explanation: final answer digits\nmore" if "what does this feature" in p else ("Yes." if "<<6>>" in p else "no")
    )
    # one request at a time: the request count below is about caching
    judge = Judge(JudgeConfig(fake_server["url"], "m", max_retries=0, concurrency=1), tmp_path / "c.jsonl")
    quiet = dict(EXAMPLE, center=1)
    record = score_feature(judge, "f", [EXAMPLE], [EXAMPLE, EXAMPLE], [quiet, quiet])
    assert record["explanation"] == "final answer digits"
    assert record["accuracy"] == 1.0 and record["f1"] == 1.0 and record["unparsed"] == 0
    fake_server["answer"] = lambda p: "hmm" if "what does" not in p else "x"
    features = [
        {
            "name": n,
            "explain_with": [dict(EXAMPLE, tokens=[n] + EXAMPLE["tokens"][1:])],
            "activating": [EXAMPLE],
            "non_activating": [quiet],
        }
        for n in "abc"
    ]
    fake_server["requests"] = 0
    first = score_features(judge, features[:2], tmp_path / "scores.jsonl")
    assert [r["unparsed"] for r in first] == [2, 2]  # "hmm" is no answer: counted wrong, recorded
    assert fake_server["requests"] == 4  # "b" asked only its explanation; its detection prompts were cached
    fake_server["fail"] = 100
    with pytest.raises(JudgeError):
        score_features(judge, features, tmp_path / "scores.jsonl")
    kept = [json.loads(line)["feature"] for line in (tmp_path / "scores.jsonl").read_text().splitlines()]
    assert kept == ["a", "b"]
    fake_server["fail"] = 0
    done = score_features(judge, features, tmp_path / "scores.jsonl")
    assert [r["feature"] for r in done] == ["a", "b", "c"] and done[0]["accuracy"] == 0.0


def test_categories_parse():
    from paper_lib.judge import parse_category

    assert parse_category("Category: Variable/Value Tracking\nsubcategory: carried digit values here now") == (
        "variable/value tracking",
        "carried digit values here",
    )
    assert parse_category("I am not sure") == (None, "")


def test_parsers():
    assert (
        parse_explanation('\n"Digits after an equals sign in arithmetic steps of a long chain here"')
        == "Digits after an equals sign in arithmetic steps of a"
    )
    assert parse_yes_no("Yes, it does") is True and parse_yes_no("NO") is False and parse_yes_no("maybe") is None


def test_end_to_end_against_vllms_openai_server_on_loopback(tmp_path):
    pytest.importorskip("vllm")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(
        os.environ,
        VLLM_ENABLE_V1_MULTIPROCESSING="0",
        HF_HUB_OFFLINE="1",
        TMPDIR=str(tmp_path),
        VLLM_CACHE_ROOT=str(tmp_path / "vllm"),
    )
    log = (tmp_path / "server.log").open("w")
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "vllm.entrypoints.openai.api_server",
            "--model",
            "data/organism/model",
            "--served-model-name",
            "organism",
            "--dtype",
            "float32",
            "--max-model-len",
            "512",
            "--enforce-eager",
            "--kv-cache-memory-bytes",
            str(2**28),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=env,
        cwd=os.path.dirname(os.path.dirname(__file__)),
    )
    try:
        cfg = JudgeConfig(f"http://127.0.0.1:{port}/v1", "organism", max_retries=0, timeout_s=60, max_tokens=16)
        judge = Judge(cfg, tmp_path / "cache.jsonl")
        deadline = time.time() + 240
        while True:
            try:
                judge.ask("1 +1")
                break
            except JudgeError:
                if time.time() > deadline or server.poll() is not None:
                    raise AssertionError((tmp_path / "server.log").read_text()[-3000:]) from None
                time.sleep(2)
        quiet = dict(EXAMPLE, center=1)
        record = score_feature(judge, "f", [EXAMPLE], [EXAMPLE], [quiet])
        # the organism is no judge: the plumbing is what is checked (a parsed record, every answer cached)
        assert set(record) == {"feature", "explanation", "n", "unparsed", "accuracy", "f1", "hard_accuracy", "n_hard"}
        assert record["n"] == 2 and record["n_hard"] == 0
        asked = judge.requests
        again = score_feature(judge, "f", [EXAMPLE], [EXAMPLE], [quiet])
        assert (
            asked == 4
            and np.isnan(again.pop("hard_accuracy"))
            and again == {k: v for k, v in record.items() if k != "hard_accuracy"}
        )
        assert judge.requests == asked
    finally:
        server.terminate()
        server.wait(timeout=60)


@pytest.fixture
def strict_server():
    """Like an API for reasoning models: refuses ``max_tokens`` and ``temperature``; answers after a short
    delay and records the most requests it had in flight at once."""
    state = {"in_flight": 0, "most": 0, "bodies": []}
    lock = threading.Lock()

    def respond(body, _headers):
        with lock:
            state["bodies"].append(body)
            state["in_flight"] += 1
            state["most"] = max(state["most"], state["in_flight"])
        time.sleep(0.05)
        with lock:
            state["in_flight"] -= 1
        refused = [k for k in ("max_tokens", "temperature") if k in body]
        if refused:
            return 400, {"error": {"message": f"Unsupported parameter: {refused}"}}
        prompt = body["messages"][0]["content"]
        return 200, completion("Reasoning... so the rating is 1" if "Rate the feature" in prompt else "yes")

    with serve(respond) as url:
        state["url"] = url
        yield state


def test_reasoning_model_parameters_concurrency_and_the_papers_rating(strict_server, tmp_path):
    features = [
        {
            "name": f"f{i}",
            "explain_with": [EXAMPLE],
            "activating": [dict(EXAMPLE, values=[0, 0, 0, 0, i + 1.0])],
            "non_activating": [],
        }
        for i in range(8)
    ]
    plain = Judge(JudgeConfig(strict_server["url"], "m", max_retries=0), tmp_path / "a.jsonl")
    with pytest.raises(JudgeError, match="HTTP 400"):
        plain.ask("hello")  # max_tokens and temperature refused
    cfg = JudgeConfig(
        strict_server["url"],
        "m",
        max_retries=0,
        temperature=None,
        max_tokens=4096,
        token_param="max_completion_tokens",
        concurrency=4,
    )
    judge = Judge(cfg, tmp_path / "b.jsonl")
    records = score_features(judge, features, tmp_path / "scores.jsonl", rate=True)
    assert [r["feature"] for r in records] == [f"f{i}" for i in range(8)]
    assert all(r["rating"] == 1 and r["accuracy"] == 1.0 for r in records)
    assert 2 <= strict_server["most"] <= 4  # a bounded pool, really concurrent
    sent = strict_server["bodies"][-1]
    assert sent["max_completion_tokens"] == 4096 and "temperature" not in sent and "max_tokens" not in sent
    assert len((tmp_path / "b.jsonl").read_text().splitlines()) == judge.requests  # the cache kept every answer
    with pytest.raises(ConfigError, match="token_param"):
        JudgeConfig(strict_server["url"], "m", token_param="max_new_tokens")


def test_non_activating_examples_are_read_from_the_store_without_a_token_array(tmp_path):
    """Contexts centred on distinct random tokens where the feature rests (<= 0), from the shards."""
    from paper_lib.activations import write_activation_store
    from paper_lib.interp import ArrayFeatures
    from paper_lib.judge import non_activating_examples

    docs = [(np.arange(i * 50, (i + 1) * 50), np.zeros((50, 1, 1))) for i in range(8)]
    store = write_activation_store(tmp_path / "s", docs, [0], ["q_proj"], docs_per_shard=3)
    values = np.where(np.arange(400) % 4 == 0, -1.0, 2.0)[:, None]  # rests on every 4th token only
    examples = non_activating_examples(ArrayFeatures(values, ["f"]), 0, store, str, n=6, width=2, seed=1)
    centres = [int(e["tokens"][e["center"]]) for e in examples]
    assert len(examples) == 6 and len(set(centres)) == 6 and all(c % 4 == 0 for c in centres)
    assert all(e["values"][e["center"]] == -1.0 and len(e["tokens"]) <= 5 for e in examples)
    assert all(int(e["tokens"][0]) // 50 == int(e["tokens"][-1]) // 50 for e in examples)  # one document each
    assert non_activating_examples(ArrayFeatures(values + 5, ["f"]), 0, store, str, n=3, width=2) == []


def test_judge_requests_from_a_store_categories_and_rating_shares(fake_server, tmp_path):
    """notebooks 04 and 06 build the paper's judge inputs from the shards (top 10 to explain, 5 more and 5
    resting contexts to detect), categorise explanations concurrently and resumably, and report rating
    shares with unrated features counted."""
    import pandas as pd

    from paper_lib.activations import write_activation_store
    from paper_lib.interp import ArrayFeatures, top_features
    from paper_lib.judge import categorise_features, judge_requests, rating_shares

    docs = [(np.arange(i * 40, (i + 1) * 40), np.zeros((40, 1, 1))) for i in range(10)]
    store = write_activation_store(tmp_path / "s", docs, [0], ["q_proj"], docs_per_shard=4)
    values = np.stack(
        [
            np.where(np.arange(400) % 20 == 0, 1.0 + np.arange(400) / 400, -1.0),  # 20 activating tokens
            np.where(np.arange(400) % 50 == 0, 1.0, -1.0),
        ],
        axis=1,
    )  # 8: too few to judge
    features = ArrayFeatures(values, ["often", "rare"])
    requests = judge_requests(features, store, str, top_features(features, 15), [0, 1], seed=2)
    assert [r["name"] for r in requests] == ["often"]
    r = requests[0]
    assert len(r["explain_with"]) == 10 and len(r["activating"]) == 5 and len(r["non_activating"]) == 5
    assert r["explain_with"][0]["value"] > r["activating"][-1]["value"] > 0
    assert all(e["values"][e["center"]] == -1.0 for e in r["non_activating"])
    fake_server["answer"] = lambda p: "category: computational operations\nsubcategory: adding numbers"
    judge = Judge(JudgeConfig(fake_server["url"], "m", max_retries=0), tmp_path / "c.jsonl")
    explained = [{"name": f"latent {i}", "explanation": f"thing {i}"} for i in range(5)]
    cats = categorise_features(judge, explained, tmp_path / "categories.jsonl")
    assert {c["category"] for c in cats} == {"computational operations"} and cats[0]["subcategory"] == "adding numbers"
    asked = fake_server["requests"]
    assert categorise_features(judge, explained, tmp_path / "categories.jsonl") == cats and fake_server["requests"] == asked
    judged = pd.DataFrame({"population": ["a"] * 4 + ["b"] * 2, "rating": [0, 0, 2, None, 1, 1]})
    shares = rating_shares(judged).set_index(["population", "class"])
    assert shares.loc[("a", "monosemantic"), "share"] == 0.5 and shares.loc[("a", "unrated"), "n"] == 4
    assert shares.loc[("b", "broad"), "share"] == 1.0 and shares.loc[("b", "broad"), "lo"] < 1.0


def test_notebook_judge_settings_come_from_the_checked_parameters():
    from paper_lib.judge import judge_config_from

    params = {
        "JUDGE_URL": "",
        "JUDGE_MODEL": "",
        "JUDGE_KEY_ENV": "OPENAI_API_KEY",
        "JUDGE_MAX_TOKENS": 48,
        "JUDGE_TOKEN_PARAM": "max_tokens",
        "JUDGE_TEMPERATURE": 0.0,
        "JUDGE_CONCURRENCY": 8,
        "JUDGE_TIMEOUT": 600.0,
    }
    assert judge_config_from(params) is None  # no judge: nothing to check
    cfg = judge_config_from(
        params
        | {
            "JUDGE_URL": "http://127.0.0.1:8000/v1",
            "JUDGE_MODEL": "m",
            "JUDGE_MAX_TOKENS": 0,
            "JUDGE_TEMPERATURE": -1.0,
            "JUDGE_TOKEN_PARAM": "max_completion_tokens",
        }
    )
    assert cfg.request_parameters() == {} and cfg.model == "m" and cfg.concurrency == 8 and cfg.timeout_s == 600.0
    with pytest.raises(ConfigError, match="token_param"):
        judge_config_from(params | {"JUDGE_URL": "http://x/v1", "JUDGE_MODEL": "m", "JUDGE_TOKEN_PARAM": "tokens"})


def test_another_judge_does_not_reuse_the_first_judges_records_and_a_failure_stays_a_judge_error(fake_server, tmp_path):
    fake_server["answer"] = lambda p: "Explanation: digits" if "what does" in p else "yes"
    quiet = dict(EXAMPLE, center=1)
    features = [{"name": n, "explain_with": [EXAMPLE], "activating": [EXAMPLE], "non_activating": [quiet]} for n in "abcdefgh"]
    first = Judge(JudgeConfig(fake_server["url"], "model-a", max_retries=0, concurrency=1), tmp_path / "c.jsonl")
    score_features(first, features[:1], tmp_path / "s.jsonl")
    fake_server["answer"] = lambda p: "Explanation: letters" if "what does" in p else "no"
    other = Judge(JudgeConfig(fake_server["url"], "model-b", max_retries=0, concurrency=1), tmp_path / "c.jsonl")
    again = score_features(other, features[:1], tmp_path / "s.jsonl")
    assert again[0]["explanation"] == "letters"  # asked anew, not model-a's answer
    assert score_features(first, features[:1], tmp_path / "s.jsonl")[0]["explanation"] == "digits"  # both kept
    fake_server["fail"] = 1000  # fails mid-run with several requests in flight: the JudgeError, not a CancelledError
    busy = Judge(JudgeConfig(fake_server["url"], "model-c", max_retries=0, concurrency=4), tmp_path / "c.jsonl")
    with pytest.raises(JudgeError):
        score_features(busy, features, tmp_path / "s.jsonl")


def test_an_explanation_that_only_names_the_token_is_at_chance_on_similar_context_negatives(fake_server, tmp_path):
    """Token 7 recurs; the feature fires on it only where the token before is 3 (a hidden condition). A judge
    whose explanation names the token detects perfectly against random resting contexts and at chance
    against contexts on the same token where the feature rests: the hard negatives show what it misses."""
    import re

    from paper_lib.activations import write_activation_store
    from paper_lib.interp import ArrayFeatures, top_features
    from paper_lib.judge import judge_requests

    rng = np.random.default_rng(0)
    ids = rng.integers(10, 60, 2000)
    ids[::5] = 7
    ids[1::10] = 3
    ids[5::10] = 7
    ids[4::10] = 3
    previous = np.r_[-1, ids[:-1]]
    values = np.where((ids == 7) & (previous == 3), 1.0 + rng.random(2000), -1.0)[:, None]
    docs = [(ids[i : i + 200], np.zeros((200, 1, 1))) for i in range(0, 2000, 200)]
    store = write_activation_store(tmp_path / "s", docs, [0], ["q_proj"], docs_per_shard=4)
    features = ArrayFeatures(values, ["after 3"])
    requests = judge_requests(features, store, str, top_features(features, 15), [0], seed=1)
    assert len(requests[0]["hard_negatives"]) == 5
    assert all(e["tokens"][e["center"]] == "7" and e["values"][e["center"]] <= 0 for e in requests[0]["hard_negatives"])

    def token_namer(prompt):
        if "what does this feature" in prompt:
            return "Explanation: the token 7"
        marked = re.findall(r"<<(.*?)>>", prompt)
        return "yes" if marked and marked[-1] == "7" else "no"

    fake_server["answer"] = token_namer
    judge = Judge(JudgeConfig(fake_server["url"], "m", max_retries=0), tmp_path / "c.jsonl")
    record = score_features(judge, requests, tmp_path / "scores.jsonl")[0]
    assert record["accuracy"] >= 0.8 and record["hard_accuracy"] == 0.5 and record["n_hard"] == 5


def test_a_reasoning_judges_thinking_never_becomes_the_answer(fake_server, tmp_path):
    """A vLLM server without a reasoning parser returns the think section in ``content``."""
    from paper_lib.judge import strip_reasoning

    assert strip_reasoning("<think>it is about 7, yes</think>\nExplanation: digits") == "Explanation: digits"
    assert strip_reasoning("the model thinks... </think> no") == "no" and strip_reasoning("<think>cut off mid-way") == ""
    fake_server["answer"] = lambda p: "<think>Explanation: wrong, and yes</think>Explanation: the token 7"
    judge = Judge(JudgeConfig(fake_server["url"], "m", max_retries=0), tmp_path / "c.jsonl")
    assert parse_explanation(judge.ask("what does this feature do?")) == "the token 7"
