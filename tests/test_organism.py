import json
import random

import pytest
import torch
from datasets import load_dataset
from transformers import AutoTokenizer

from paper_lib.formats import chat_messages
from paper_lib.organism import (
    AIME_SUBDIR,
    GPQA_SUBDIR,
    MATH_SUBDIR,
    OPS,
    PROBE_SUBDIR,
    SPLITS,
    TRACES_SUBDIR,
    OrganismConfig,
    OrganismError,
    Problem,
    apply_op,
    build_datasets,
    build_model,
    build_organism,
    build_tokenizer,
    chat_document,
    check_organism_dir,
    load_organism,
    packed_batch,
    parse_chain,
    parse_chat_answer,
    parse_textbook_answer,
    pretrain,
    problem_from_row,
    sample_problem,
    score_formats,
    task_for,
    textbook_document,
    thinking_answer,
)
from paper_lib.paths import REPO_ROOT

SHARED_BENCHMARKS = REPO_ROOT.parent / "shared" / "benchmarks"  # reference files beside the checkout

TINY = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=2,
    num_key_value_heads=1,
    steps=6,
    warmup_steps=1,
    eval_every=3,
    batch_size=4,
    n_probe_per_k=4,
)


# --- the task -----------------------------------------------------------------------------------------


def test_ops_are_the_40_fact_table():
    assert [apply_op(7, op) for op in OPS] == [8, 9, 4, 1]
    with pytest.raises(ValueError, match="unknown op"):
        apply_op(1, "-1")


def test_problem_steps_carry_values_and_end_in_the_answer():
    p = Problem(7, ("+2", "x2", "+1"))
    assert p.steps == "7+2=9;9x2=8;8+1=9" and p.answer == "9" and p.question == "7 +2 x2 +1"
    mc = Problem(7, ("+2", "x2", "+1"), choices=(3, 9, 0, 5))
    assert mc.answer == "B" and mc.steps.endswith(";9?A3,B9") and mc.question == "7 +2 x2 +1\n(A) 3 (B) 9 (C) 0 (D) 5"
    assert parse_chain(mc.question) == p
    with pytest.raises(ValueError, match="choices"):
        Problem(7, ("+2",), choices=(1, 2, 3, 4))
    with pytest.raises(ValueError, match="not an organism chain"):
        parse_chain("What is 2 + 2?")


def test_sampled_multiple_choice_has_four_distinct_options_including_the_value():
    rng = random.Random(0)
    for _ in range(200):
        p = sample_problem(rng, rng.randint(1, 8), multiple_choice=True)
        assert len(set(p.choices)) == 4 and p.value in p.choices


def test_answer_parsers_take_the_right_span_and_return_none_for_non_answers():
    assert parse_textbook_answer("7+2=9;9x2=8\nanswer\nAnswer: 8<|endoftext|>") == "8"
    assert parse_textbook_answer("7+2=9;9x2=8") is None
    assert parse_textbook_answer("7+2=9\nanswer\nno answer") is None
    doc = textbook_document(Problem(7, ("+2", "x2")))
    assert doc == "Q 7 +2 x2\nthink\n7+2=9;9x2=8\nanswer\nAnswer: 8<|endoftext|>"
    assert parse_textbook_answer(doc.split("think\n", 1)[1]) == "8"
    assert parse_chat_answer("Answer: 4<|im_end|>") == "4"
    assert parse_chat_answer("<|im_start|>think\nAnswer: 1\n<|im_start|>answer\nAnswer: 3<|im_end|>") == "3"
    assert parse_chat_answer("no idea<|im_end|>") is None


# --- tokenizer and chat template --------------------------------------------------------------------


def test_tokenizer_reloads_with_autotokenizer_to_identical_ids(tmp_path):
    tok = build_tokenizer()
    tok.save_pretrained(tmp_path)
    reloaded = AutoTokenizer.from_pretrained(tmp_path)
    p = Problem(3, ("x3", "+1", "x2"), choices=(1, 0, 3, 4))
    texts = [textbook_document(p), chat_document(tok, p), thinking_answer(p), "Ünïcode ☃ and 12345 spaces  \n\n tabs\t"]
    for text in texts:
        ids = tok(text)["input_ids"]
        assert reloaded(text)["input_ids"] == ids
        assert reloaded.decode(ids) == text
    assert reloaded.convert_tokens_to_ids(["<|endoftext|>", "<|im_start|>", "<|im_end|>"]) == [256, 257, 258]
    assert reloaded("<|im_start|>think")["input_ids"][0] == 257  # special tokens are single ids


def test_chat_template_is_chatml_with_generation_markers():
    tok = build_tokenizer()
    text = tok.apply_chat_template(chat_messages("1 +2", "Answer: 3"), tokenize=False)
    assert text == "<|im_start|>user\n1 +2<|im_end|>\n<|im_start|>assistant\nAnswer: 3<|im_end|>\n"
    prompt = tok.apply_chat_template(chat_messages("1 +2"), tokenize=False, add_generation_prompt=True)
    assert prompt == "<|im_start|>user\n1 +2<|im_end|>\n<|im_start|>assistant\n"
    enc = tok.apply_chat_template(chat_messages("1 +2", "Answer: 3"), return_dict=True, return_assistant_tokens_mask=True)
    ids, mask = enc["input_ids"], enc["assistant_masks"]
    assert tok.decode([i for i, m in zip(ids, mask) if m]) == "Answer: 3<|im_end|>"


# --- datasets ---------------------------------------------------------------------------------------


def test_datasets_have_the_sizes_and_are_disjoint():
    rows, held_out = build_datasets(OrganismConfig())
    assert {k: len(v) for k, v in rows.items()} == {
        AIME_SUBDIR: 30,
        MATH_SUBDIR: 500,
        GPQA_SUBDIR: 198,
        PROBE_SUBDIR: 40 + 20 + 80 + 100 * 5,
        TRACES_SUBDIR: 1000,
    }
    chains = lambda qs: {q.split("\n")[0] for q in qs}  # noqa: E731
    trace_chains = chains(r["question"] for r in rows[TRACES_SUBDIR])
    bench = chains(
        [r["problem"] for r in rows[AIME_SUBDIR]]
        + [r["problem"] for r in rows[MATH_SUBDIR]]
        + [r["Question"] for r in rows[GPQA_SUBDIR]]
    )
    assert len(trace_chains) == 1000 and not trace_chains & bench
    assert all(parse_chain(q).key in held_out for q in bench)
    assert [sum(r["level"] == lv for r in rows[MATH_SUBDIR]) for lv in range(1, 6)] == [43, 90, 105, 128, 134]


def test_datasets_are_deterministic_given_the_seed():
    assert build_datasets(OrganismConfig(seed=5))[0] == build_datasets(OrganismConfig(seed=5))[0]
    assert build_datasets(OrganismConfig(seed=5))[0] != build_datasets(OrganismConfig(seed=6))[0]


@pytest.mark.skipif(not SHARED_BENCHMARKS.is_dir(), reason="../shared/benchmarks is absent")
@pytest.mark.parametrize("subdir, real_file", [(AIME_SUBDIR, "aime24.jsonl"), (MATH_SUBDIR, "math500.jsonl")])
def test_benchmark_schemas_match_the_real_files(subdir, real_file):
    rows, _ = build_datasets(OrganismConfig())
    real = json.loads((SHARED_BENCHMARKS / real_file).read_text().splitlines()[0])
    required = {"problem", "solution", "answer"} | ({"subject", "level", "unique_id"} if subdir == MATH_SUBDIR else {"id", "url"})
    assert required <= set(real) and required <= set(rows[subdir][0])
    for key in required:
        assert type(rows[subdir][0][key]) is type(real[key]), key


def test_gpqa_rows_shuffle_to_four_options_with_the_gold_letter():
    rows, _ = build_datasets(OrganismConfig())
    for row in rows[GPQA_SUBDIR][:50]:
        p = problem_from_row(GPQA_SUBDIR, row, seed=0)
        assert str(p.choices[ord(p.answer) - 65]) == row["Correct Answer"]
        assert p == problem_from_row(GPQA_SUBDIR, row, seed=0)


# --- build, save, load ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_organism(tmp_path_factory):
    out = tmp_path_factory.mktemp("organism")
    history = build_organism(OrganismConfig(**TINY), out, threads=1)
    return out, history


def test_tiny_build_writes_a_loadable_organism(tiny_organism):
    out, history = tiny_organism
    assert len(history) == TINY["steps"] and history["loss"].notna().all()
    assert {"acc_textbook", "acc_chat"} <= set(history.columns)
    model, tok, cfg = load_organism(out)
    assert cfg == OrganismConfig(**TINY) and type(model).__name__ == "Qwen2ForCausalLM"
    for name, split in SPLITS.items():
        ds = load_dataset(str(out / name), split=split)
        assert len(ds) > 0


def test_build_is_deterministic_given_the_seed(tiny_organism, tmp_path):
    out, _ = tiny_organism
    build_organism(OrganismConfig(**TINY), tmp_path, threads=1)
    a, b = load_organism(out)[0], load_organism(tmp_path)[0]
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(x, y), name


def test_packed_rows_are_whole_documents_end_to_end_without_padding():
    """Packed pretraining: every row is ``pack_length`` real tokens; rows laid end to end are documents of
    both formats, each closed by <|endoftext|>; what one step leaves over starts the next."""
    cfg = OrganismConfig(**{**TINY, "batch_size": 3, "pack_length": 64})
    tok = build_tokenizer()
    first, rest = packed_batch(random.Random(0), cfg, tok, set(), [])
    assert first["input_ids"].shape == (3, 64) and bool(first["attention_mask"].all())
    second, _ = packed_batch(random.Random(1), cfg, tok, set(), list(rest))
    assert second["input_ids"].flatten()[: len(rest)].tolist() == rest[: 3 * 64]
    text = tok.decode(first["input_ids"].flatten().tolist() + rest)
    docs = text.split("<|endoftext|>")
    assert len(docs) > 3 and docs[-1] == ""
    for doc in docs[:-1]:
        if doc.startswith("Q "):
            question, steps = doc[2:].split("\nthink\n")
            answer = parse_textbook_answer("\nthink\n" + steps)
            assert answer == (parse_chain(question).answer if "\n" not in question else steps[-1])
        else:
            assert doc.startswith("<|im_start|>") and parse_chat_answer(doc.split("assistant")[-1]) is not None


def test_packed_pretraining_trains_on_every_token_and_is_refused_past_the_context():
    cfg = OrganismConfig(**{**TINY, "pack_length": 48})
    tok = build_tokenizer()
    model = build_model(cfg, tok)
    history = pretrain(model, tok, cfg, set())
    assert len(history) == cfg.steps and history["loss"].notna().all()
    assert history["loss"].iloc[-1] < history["loss"].iloc[0]
    with pytest.raises(Exception, match="pack_length: must lie in"):
        OrganismConfig(**{**TINY, "pack_length": 1024})


def test_missing_or_corrupt_organism_names_the_path_and_the_fix(tiny_organism, tmp_path):
    with pytest.raises(OrganismError, match=str(tmp_path / "nowhere") + r".*REBUILD=True"):
        load_organism(tmp_path / "nowhere")
    out, _ = tiny_organism
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(out, broken)
    (broken / "model" / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(OrganismError, match=str(broken / "model")):
        load_organism(broken)
    (broken / "model" / "model.safetensors").unlink()
    with pytest.raises(OrganismError, match="model/model.safetensors"):
        check_organism_dir(broken)


# --- the committed organism -------------------------------------------------------------------------


def test_committed_organism_reloads_by_path_with_its_datasets(organism_dir, organism):
    model, tok, cfg = organism
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(2.01e6, rel=0.05) and cfg.num_hidden_layers == 8
    traces = load_dataset(str(organism_dir / TRACES_SUBDIR), split="train")
    assert len(traces) == 1000 and {"question", "deepseek_thinking_trajectory", "deepseek_attempt"} <= set(traces.column_names)
    with torch.no_grad():
        ids = tok(textbook_document(task_for(cfg).parse("a1 b2 a+1 ?a")), return_tensors="pt")
        assert torch.isfinite(model(**ids).logits).all()


def test_committed_organism_has_the_latent_gap(organism_dir, organism):
    """Regression lock on the organism's key numbers (greedy, so tolerances only absorb float noise)."""
    model, tok, cfg = organism
    task = task_for(cfg)
    aime = [problem_from_row(AIME_SUBDIR, r, task=task) for r in load_dataset(str(organism_dir / AIME_SUBDIR), split="train")]
    math = load_dataset(str(organism_dir / MATH_SUBDIR), split="test")
    level5 = [problem_from_row(MATH_SUBDIR, r, task=task) for r in math if r["level"] == 5]
    hard = score_formats(model, tok, aime + level5)
    textbook = hard[hard.format == "textbook"]["correct"].mean()
    chat_aime = hard[(hard.format == "chat")].head(len(aime))["correct"].mean()
    assert textbook >= 0.85
    assert chat_aime <= 0.35
    assert textbook == pytest.approx(EXPECTED["textbook_aime_k"], abs=0.03)
    assert chat_aime == pytest.approx(EXPECTED["chat_aime"], abs=0.04)


# Measured on the committed organism 2 (greedy, CPU, 2026-11-30): textbook 164/164 at k=6, chat 3/30 on AIME-like.
EXPECTED = {"textbook_aime_k": 1.0, "chat_aime": 3 / 30}


def test_the_committed_organisms_datasets_are_what_its_config_builds(organism_dir):
    """A lock on the builder: from the committed organism's config.json, build_datasets writes exactly the
    committed files (organism 2's task went in beside organism 1's without moving a row)."""
    cfg = OrganismConfig.load(organism_dir)
    rows, _ = build_datasets(cfg)
    for name, subset in rows.items():
        lines = (organism_dir / name / f"{SPLITS[name]}.jsonl").read_text().splitlines()
        assert [json.loads(line) for line in lines] == json.loads(json.dumps(subset)), name  # tuples as JSON lists
