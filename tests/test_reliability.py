"""Nothing lost, nothing stale: typed parameters, fingerprinted artifacts, complete adapter checks,
torn-file recovery, validated rows, checked shards, grading that cannot hang, judge errors that name
the feature. One class of careful-user trial per test."""

import json
import re
import shutil
import time

import numpy as np
import pytest
import torch

from paper_lib.config import ConfigError
from paper_lib.data import DataError, load_table
from paper_lib.evaluation import EvaluationError, GenerationSpec, Item, evaluate, load_benchmark
from paper_lib.results import read_jsonl

# --- 1. parameters -------------------------------------------------------------------------------------


def test_papermill_strings_for_booleans_and_numbers_are_refused_and_choices_are_exact():
    from paper_lib.params import check_parameters

    namespace = {"OVERWRITE": "false", "BACKEND": "vllm"}
    with pytest.raises(ConfigError, match=r"OVERWRITE: expected a bool \(True or False\), got 'false'.*string 'false'"):
        check_parameters(namespace, "02_evaluate_reasoning")
    with pytest.raises(ConfigError, match="BACKEND: 'VLLM' is not one of \\['vllm', 'hf'\\]"):
        check_parameters({"BACKEND": "VLLM"}, "02_evaluate_reasoning", choices={"BACKEND": ("vllm", "hf")})
    with pytest.raises(ConfigError, match="EPOCHS: expected a number, got 'abc'"):
        check_parameters({"EPOCHS": "abc"}, "01_train_rank1_lora")
    with pytest.raises(ConfigError, match="BF16: expected a bool"):
        check_parameters({"BF16": "yes"}, "01_train_rank1_lora")
    namespace = {"EPOCHS": 5}
    values = check_parameters(namespace, "01_train_rank1_lora")
    assert namespace["EPOCHS"] == 5.0 and isinstance(namespace["EPOCHS"], float) and values["SEED"] == 42


def test_every_notebook_checks_its_parameters_before_any_work_and_deletes_only_after_loading():
    from paper_lib.run_notebooks import list_notebooks

    for path in list_notebooks():
        source = path.read_text()
        call = re.search(r"check_parameters\(\s*globals\(\),\s*SECTION", source).start()
        for work in ("artifact_dir(", "load_trained(", "shutil.rmtree(", "clear_run_dir(", "build_organism("):
            if work in source:
                assert call < source.index(work), f"{path.name}: {work} before the parameters are checked"
    evaluate_nb = (path.parent / "02_evaluate_reasoning.py").read_text()
    assert (
        evaluate_nb.index("load_benchmark(")
        < evaluate_nb.index("check_adapter(adapter_dir")
        < evaluate_nb.index("clear_run_dir(out_dir, SECTION)")
    )


# --- 2. stale artifacts --------------------------------------------------------------------------------


class FakeEngine:
    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def complete(self, prompts, max_tokens, spec, seeds, stop_at_im_start, adapter):
        return [("s", 1) if stop_at_im_start else (" 4<|im_end|>", 2) for _ in prompts]


def test_evaluation_files_refuse_other_settings_and_changed_questions(tmp_path):
    from paper_lib.organism import build_tokenizer

    engine = FakeEngine(build_tokenizer())
    items = [Item(str(i), f"{i} +1", "4", "math") for i in range(3)]
    path = tmp_path / "base" / "aime24.greedy.jsonl"
    evaluate(engine, items, GenerationSpec(max_tokens=64, answer_tokens=8), path)
    with pytest.raises(EvaluationError, match=r"other settings \(spec: .*'max_tokens': 64.*'max_tokens': 96"):
        evaluate(engine, items, GenerationSpec(max_tokens=96, answer_tokens=8), path)
    changed = [Item("1", "1 +2", "4", "math")]
    with pytest.raises(EvaluationError, match="question '1' as it read before"):
        evaluate(engine, changed, GenerationSpec(max_tokens=64, answer_tokens=8), path)
    fresh = evaluate(engine, items, GenerationSpec(max_tokens=96, answer_tokens=8), path, overwrite=True)
    assert len(fresh) == 3 and json.loads(path.with_name("aime24.greedy.meta.json").read_text())["spec"]["max_tokens"] == 96


def test_samples_whose_meta_file_is_missing_are_kept_and_the_run_stops(tmp_path):
    """Deleting ``*.meta.json`` used to delete and regenerate its samples silently."""
    from paper_lib.organism import build_tokenizer

    engine = FakeEngine(build_tokenizer())
    items = [Item(str(i), f"{i} +1", "4", "math") for i in range(3)]
    path = tmp_path / "base" / "aime24.greedy.jsonl"
    evaluate(engine, items, GenerationSpec(max_tokens=64, answer_tokens=8), path)
    kept = path.read_text()
    path.with_name("aime24.greedy.meta.json").unlink()
    with pytest.raises(EvaluationError, match="meta.json is missing"):
        evaluate(engine, items, GenerationSpec(max_tokens=64, answer_tokens=8), path)
    assert path.read_text() == kept


def test_a_variant_run_adopts_earlier_base_samples_only_when_generated_alike(tmp_path):
    """Notebook 02's REUSE_FROM: the base's samples from an earlier run are copied when spec and engine
    match, so only missing questions are generated; other settings are never adopted."""
    from paper_lib.evaluation import adoption
    from paper_lib.organism import build_tokenizer

    calls = []

    class Counting(FakeEngine):
        def complete(self, prompts, *args):
            calls.append(len(prompts))
            return super().complete(prompts, *args)

    engine = Counting(build_tokenizer())
    items = [Item(str(i), f"{i} +1", "4", "math") for i in range(4)]
    spec = GenerationSpec(max_tokens=64, answer_tokens=8)
    evaluate(engine, items[:3], spec, tmp_path / "earlier" / "base" / "aime24.greedy.jsonl")
    calls.clear()
    target = tmp_path / "variant" / "base" / "aime24.greedy.jsonl"
    assert (
        adoption(
            tmp_path / "earlier" / "base" / "aime24.greedy.jsonl", target, engine, GenerationSpec(max_tokens=96, answer_tokens=8)
        )
        is not None
    )  # another budget: not adopted
    assert not target.exists()
    assert adoption(tmp_path / "earlier" / "base" / "aime24.greedy.jsonl", target, engine, spec) is None
    assert len(evaluate(engine, items, spec, target)) == 4
    assert sum(calls) == 2  # only the fourth question was generated (a thinking and an answer request)
    assert adoption(tmp_path / "earlier" / "base" / "aime24.greedy.jsonl", target, engine, spec) is not None  # exists


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    from paper_lib.organism import TRACES_SUBDIR, OrganismConfig, build_datasets, build_model, build_tokenizer, write_jsonl
    from paper_lib.training import TrainConfig, train

    root = tmp_path_factory.mktemp("stale")
    tok = build_tokenizer()
    build_model(
        OrganismConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1),
        tok,
    ).save_pretrained(root / "model")
    tok.save_pretrained(root / "model")
    rows, _ = build_datasets(OrganismConfig())
    write_jsonl(rows[TRACES_SUBDIR][:16], root / "traces" / "train.jsonl")
    cfg = TrainConfig(
        model=str(root / "model"),
        dataset=str(root / "traces"),
        output_dir=str(root / "run"),
        epochs=1.0,
        global_batch_size=8,
        per_device_batch_size=8,
        max_length=128,
        bf16=False,
        gradient_checkpointing=False,
        save_steps=1000,
    )
    train(cfg)
    return root, cfg, rows[TRACES_SUBDIR]


def test_a_finished_run_is_reused_only_for_the_same_settings_and_traces(tiny_run):
    import dataclasses

    from paper_lib.organism import write_jsonl
    from paper_lib.training import train

    root, cfg, rows = tiny_run
    assert train(cfg)["optimizer_steps"] == 2  # the same settings: reused
    with pytest.raises(ConfigError, match="other inputs \\(learning_rate: 0.001 -> 0.003"):
        train(dataclasses.replace(cfg, learning_rate=3e-3))
    write_jsonl(rows[16:32], root / "other" / "train.jsonl")
    shutil.copy(root / "other" / "train.jsonl", root / "traces" / "train.jsonl")  # same path, other traces
    with pytest.raises(ConfigError, match="traces: "):
        train(cfg)
    write_jsonl(rows[:16], root / "traces" / "train.jsonl")


def test_extraction_into_a_folder_of_other_inputs_is_refused(organism, tmp_path):
    from peft import get_peft_model

    from paper_lib.activations import extract_activation_shards
    from paper_lib.training import LoraSpec, build_lora_config

    model, tok, _ = organism
    import copy

    peft_model = get_peft_model(copy.deepcopy(model), build_lora_config(LoraSpec(), model.config)).eval()
    extract_activation_shards(
        peft_model, tok, ["3 +1\nthink\n", "4 x2\nthink\n"], tmp_path / "acts", provenance={"adapter_weights": "aaa"}
    )
    with pytest.raises(ValueError, match="other inputs \\(texts: "):
        extract_activation_shards(
            peft_model, tok, ["5 +1\nthink\n", "4 x2\nthink\n"], tmp_path / "acts", provenance={"adapter_weights": "aaa"}
        )
    with pytest.raises(ValueError, match="provenance"):
        extract_activation_shards(
            peft_model, tok, ["3 +1\nthink\n", "4 x2\nthink\n"], tmp_path / "acts", provenance={"adapter_weights": "bbb"}
        )


# --- 3. adapters that do not fit their base --------------------------------------------------------------


def test_adapters_are_checked_against_their_base_before_any_work(tiny_run, tmp_path):
    from safetensors.torch import load_file, save_file

    from paper_lib.training import AdapterError, check_adapter

    root, cfg, _ = tiny_run
    adapter = root / "run" / "final"
    check_adapter(adapter, cfg.model)

    def variant(name, change):
        out = tmp_path / name
        shutil.copytree(adapter, out)
        tensors = load_file(str(out / "adapter_model.safetensors"))
        save_file(change(tensors), str(out / "adapter_model.safetensors"))
        return out

    def wider(tensors):  # an adapter for another intermediate size
        key = next(k for k in tensors if "down_proj.lora_A" in k)
        tensors[key] = torch.zeros(1, tensors[key].shape[1] * 2)
        return tensors

    def deeper(tensors):  # an adapter from a deeper model: a layer the base lacks
        extra = {k.replace("layers.1.", "layers.7."): v.clone() for k, v in tensors.items() if "layers.1." in k}
        return {**tensors, **extra}

    def nan(tensors):
        key = next(k for k in tensors if "lora_B" in k)
        tensors[key] = torch.full_like(tensors[key], float("nan"))
        return tensors

    with pytest.raises(AdapterError, match="down_proj.lora_A.weight has shape \\(1, 128\\).*needs \\(1, 64\\)"):
        check_adapter(variant("wider", wider), cfg.model)
    with pytest.raises(AdapterError, match="adapts layer 7, but .* has 2 layers"):
        check_adapter(variant("deeper", deeper), cfg.model)
    with pytest.raises(AdapterError, match="NaN or infinite"):
        check_adapter(variant("nan", nan), cfg.model)
    # PEFT records no base (null) for a model built from a config: the shapes decide, never a TypeError
    unnamed, wide_unnamed = variant("unnamed", lambda t: t), variant("wide_unnamed", wider)
    for folder in (unnamed, wide_unnamed):
        config = json.loads((folder / "adapter_config.json").read_text())
        (folder / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": None}))
    check_adapter(unnamed, cfg.model)
    with pytest.raises(AdapterError, match="needs \\(1, 64\\)"):
        check_adapter(wide_unnamed, cfg.model)
    torn = tmp_path / "torn"
    shutil.copytree(adapter, torn)
    data = (torn / "adapter_model.safetensors").read_bytes()
    (torn / "adapter_model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(AdapterError, match="cannot read the adapter weights .*torn/adapter_model.safetensors"):
        check_adapter(torn, cfg.model)
    from paper_lib.paths import artifact_dir
    from paper_lib.training import load_trained

    run = artifact_dir(tmp_path / "nan_run")
    shutil.copytree(root / "run", run, ignore=shutil.ignore_patterns("checkpoints"))
    shutil.copy(tmp_path / "nan" / "adapter_model.safetensors", run / "final" / "adapter_model.safetensors")
    with pytest.raises(AdapterError, match="NaN"):
        load_trained(run)  # notebooks 03-06 load adapters this way


# --- 4. torn files ---------------------------------------------------------------------------------------


def test_a_torn_last_line_is_dropped_and_cut_so_the_rerun_resumes(tmp_path, caplog):
    path = tmp_path / "samples.jsonl"
    path.write_text('{"id": "0", "sample": 0}\n{"id": "1", "sample": 0}\n{"id": "2", "sam')
    assert [r["id"] for r in read_jsonl(path)] == ["0", "1"]
    assert "torn last line" in caplog.text
    assert path.read_text() == '{"id": "0", "sample": 0}\n{"id": "1", "sample": 0}\n'  # appends start clean
    path.write_text('{"id": "0"}\n{"id": \n{"id": "2"}\n')
    with pytest.raises(ValueError, match="line 2 is not JSON"):
        read_jsonl(path)


def test_evaluation_and_the_judge_cache_resume_after_a_torn_line(tmp_path):
    from paper_lib.judge import Judge, JudgeConfig
    from paper_lib.organism import build_tokenizer

    engine = FakeEngine(build_tokenizer())
    items = [Item(str(i), f"{i} +1", "4", "math") for i in range(4)]
    path = tmp_path / "m" / "b.greedy.jsonl"
    spec = GenerationSpec(max_tokens=64, answer_tokens=8)
    evaluate(engine, items[:2], spec, path)
    with path.open("a") as handle:
        handle.write('{"id": "2", "sample": 0, "respo')  # killed mid-write
    assert sorted(evaluate(engine, items, spec, path)["id"]) == ["0", "1", "2", "3"]
    cache = tmp_path / "cache.jsonl"
    cache.write_text('{"key": "k", "prompt": "p", "answer": "yes"}\n{"key": "k2", "pro')
    judge = Judge(JudgeConfig("http://127.0.0.1:9/v1", "m"), cache)
    assert judge.cache == {"k": "yes"}


# --- 5. rows that cannot be graded -------------------------------------------------------------------------


def write_rows(folder, rows, name="train.jsonl"):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(folder)


def test_benchmark_rows_are_validated_with_the_row_named(tmp_path):
    aime = {"id": 1, "problem": "p", "solution": "", "answer": "7", "url": "", "year": "2024"}
    assert len(load_benchmark("aime24", write_rows(tmp_path / "ok", [aime]))) == 1
    with pytest.raises(EvaluationError, match="row 1 has no 'answer'"):
        load_benchmark("aime24", write_rows(tmp_path / "missing", [aime, {**aime, "id": 2, "answer": ""}]))
    with pytest.raises(EvaluationError, match="row 0's answer 'seven' is not an integer"):
        load_benchmark("aime24", write_rows(tmp_path / "word", [{**aime, "answer": "seven"}]))
    with pytest.raises(EvaluationError, match="rows 0 and 1 share the id '1'"):
        load_benchmark("aime24", write_rows(tmp_path / "dup", [aime, aime]))
    gpqa = {
        "Question": "q",
        "Correct Answer": "a",
        "Incorrect Answer 1": "b",
        "Incorrect Answer 2": "c",
        "Incorrect Answer 3": None,
        "Record ID": "r",
    }
    with pytest.raises(EvaluationError, match="row 0 has no 'Incorrect Answer 3'"):
        load_benchmark("gpqa_diamond", write_rows(tmp_path / "gpqa", [gpqa]))


def test_a_folder_with_two_data_files_is_refused_unless_the_file_is_named(tmp_path):
    folder = tmp_path / "aime"
    write_rows(folder, [{"problem": "p", "answer": "1"}])
    write_rows(folder, [{"problem": "p", "answer": "1"}], name="train_backup.jsonl")
    with pytest.raises(DataError, match="several data files .*train.jsonl.*load_dataset would merge"):
        load_table(str(folder))
    assert len(load_table(str(folder / "train.jsonl"))) == 1
    shards = tmp_path / "sharded"
    for i in range(2):
        write_rows(shards, [{"problem": "p", "answer": str(i)}], name=f"train-0000{i}-of-00002.jsonl")
    assert len(load_table(str(shards))) == 2  # shards of one split are one file


# --- 6. corrupt activation shards ----------------------------------------------------------------------------


@pytest.fixture
def store_dir(tmp_path):
    from paper_lib.activations import write_activation_store

    rng = np.random.default_rng(0)
    docs = [(rng.integers(0, 50, n), rng.normal(size=(n, 2, 7))) for n in (5, 7, 3)]
    write_activation_store(
        tmp_path / "store",
        docs,
        [0, 1],
        ["gate_proj", "up_proj", "down_proj", "q_proj", "k_proj", "v_proj", "o_proj"],
        docs_per_shard=2,
    )
    return tmp_path / "store"


def test_a_truncated_shard_is_refused_at_open_naming_the_file(store_dir):
    from paper_lib.activations import ActivationStore

    acts = store_dir / "shard_00000.acts.npy"
    acts.write_bytes(acts.read_bytes()[:-40])
    with pytest.raises(ValueError, match="shard_00000.acts.npy has .* bytes, .* when written: it is truncated"):
        ActivationStore(store_dir)


def test_flipped_bytes_in_a_shard_fail_the_checksum(store_dir):
    from paper_lib.activations import ActivationStore

    acts = store_dir / "shard_00001.acts.npy"
    data = bytearray(acts.read_bytes())
    data[-3] ^= 0xFF
    acts.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="shard_00001.acts.npy changed since it was written"):
        ActivationStore(store_dir)
    ActivationStore(store_dir, verify=False)  # sizes still agree: only the checksum sees it


# --- 7. hangs and late errors -----------------------------------------------------------------------------------


def test_a_power_tower_is_refused_before_sympy_can_hang_on_it():
    import threading

    from paper_lib.grading import is_correct_math

    threads = threading.active_count()
    start = time.perf_counter()
    assert not is_correct_math("<|im_start|>answer\nFinal Answer: \\boxed{9^{9^{9}}}", "1", timeout_s=30)
    assert not is_correct_math("\\boxed{100!}", "1", timeout_s=30)
    assert time.perf_counter() - start < 2 and threading.active_count() == threads  # nothing left running
    assert is_correct_math("\\boxed{3^{2}+4^{2}}", "25") and is_correct_math("\\boxed{2^{10}}", "1024")


def test_malformed_judge_replies_become_a_judge_error_naming_the_feature(tmp_path):
    from loopback import serve

    from paper_lib.judge import Judge, JudgeConfig, JudgeError, score_feature

    replies = iter([b"not json at all", {"id": "x", "object": "chat.completion", "created": 0, "model": "m", "choices": []}])
    with serve(lambda body, headers: (200, next(replies))) as url:
        judge = Judge(JudgeConfig(url, "m", max_retries=0), tmp_path / "c.jsonl")
        example = {"tokens": ["a"], "values": [1.0], "center": 0}
        for _ in range(2):
            with pytest.raises(JudgeError, match="feature L3 gate_proj \\+: the judge at .* (not a chat completion|malformed)"):
                score_feature(judge, "L3 gate_proj +", [example], [example], [])
    with pytest.raises(ConfigError, match="base_url: not an http"):
        JudgeConfig("localhost:8000", "m")  # what notebooks 04 and 06 build in their first cell


def test_an_sae_is_reused_only_for_the_same_spec_and_activations(tmp_path):
    import dataclasses

    from paper_lib.activations import write_activation_store
    from paper_lib.formats import ADAPTER_MODULES
    from paper_lib.sae import SAESpec, train_or_reuse_sae

    rng = np.random.default_rng(0)
    docs = [(np.arange(50, dtype=np.int32), rng.normal(size=(50, 1, 7)).astype(np.float32)) for _ in range(20)]
    store = write_activation_store(tmp_path / "store", docs, [0], list(ADAPTER_MODULES), dtype="float32")
    spec = SAESpec(expansion=2, k=2, batch_size=100, epochs=1, dead_tokens=500)
    first = train_or_reuse_sae(store, spec, tmp_path / "sae")
    assert train_or_reuse_sae(store, spec, tmp_path / "sae").equals(first)  # the same inputs: reused
    with pytest.raises(ConfigError, match="other settings or inputs \\(k: 2 -> 3"):
        train_or_reuse_sae(store, dataclasses.replace(spec, k=3), tmp_path / "sae")
    other = write_activation_store(tmp_path / "other", docs[:10], [0], list(ADAPTER_MODULES), dtype="float32")
    with pytest.raises(ConfigError, match="store: "):
        train_or_reuse_sae(other, spec, tmp_path / "sae")
