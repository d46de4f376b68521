import json
import math
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer

from paper_lib.config import ConfigError
from paper_lib.data import DataError, build_sft_dataset, format_s1_text, load_traces, s1_assistant_turn, to_prompt_completion
from paper_lib.organism import TRACES_SUBDIR, build_tokenizer
from paper_lib.paths import artifact_dir
from paper_lib.throughput import qwen25_config
from paper_lib.training import (
    ALL_MODULES,
    LoraSpec,
    TrainConfig,
    build_lora_config,
    build_sft_config,
    count_lora_parameters,
    lora_spec_for,
)

FIXTURES = Path(__file__).parent.parent / "paper_lib" / "templates"
ROW = {
    "question": "Find x if 2x + 3 = 7.",
    "deepseek_thinking_trajectory": "  Subtract 3: 2x = 4.\nDivide by 2: x = 2.  ",
    "deepseek_attempt": "The answer is $\\boxed{2}$.",
    "solution": "2",
}


# --- s1 formatting ---------------------------------------------------------------------------------


def test_s1_assistant_turn_adds_answer_prefix_only_when_missing():
    assert s1_assistant_turn(" a\n", "42") == "<|im_start|>think\na\n<|im_start|>answer\nAnswer: 42"
    assert s1_assistant_turn("a", "Answer: 42") == "<|im_start|>think\na\n<|im_start|>answer\nAnswer: 42"


def test_formatting_matches_s1_string_for_string_with_qwens_default_system_prompt():
    tok = build_tokenizer()
    tok.chat_template = (FIXTURES / "qwen2.5_chat_template.jinja").read_text()
    expected = (
        "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\nFind x if 2x + 3 = 7.<|im_end|>\n"
        "<|im_start|>assistant\n<|im_start|>think\nSubtract 3: 2x = 4.\nDivide by 2: x = 2.\n"
        "<|im_start|>answer\nAnswer: The answer is $\\boxed{2}$.<|im_end|>\n"
    )
    assert format_s1_text(tok, ROW) == expected


def test_organism_template_formats_without_a_system_prompt():
    tok = build_tokenizer()
    text = format_s1_text(tok, {**ROW, "deepseek_attempt": "2"})
    assert text.startswith("<|im_start|>user\nFind x") and text.endswith("Answer: 2<|im_end|>\n")


def test_load_traces_reads_local_folders_and_files_and_names_bad_rows(tmp_path, organism_dir):
    assert len(load_traces(str(organism_dir / TRACES_SUBDIR))) == 1000
    good = tmp_path / "good.jsonl"
    good.write_text(json.dumps(ROW) + "\n")
    assert load_traces(str(good))[0]["question"] == ROW["question"]
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(ROW) + "\n" + json.dumps({**ROW, "deepseek_attempt": ""}) + "\n")
    with pytest.raises(DataError, match=r"row 1 has no 'deepseek_attempt'"):
        load_traces(str(bad))
    missing = tmp_path / "missing.jsonl"
    missing.write_text(json.dumps({"question": "q"}) + "\n")
    with pytest.raises(DataError, match="missing columns"):
        load_traces(str(missing))
    with pytest.raises(DataError, match="no such file"):
        load_traces("data/does_not_exist.jsonl")
    with pytest.raises(DataError, match="could not load dataset 'nobody/nothing'"):
        load_traces("nobody/nothing")  # offline: a hub id fails cleanly


def test_overlong_rows_are_counted_not_dropped(organism_dir):
    traces = load_traces(str(organism_dir / TRACES_SUBDIR)).select(range(20))
    dataset, stats = build_sft_dataset(traces, build_tokenizer(), max_length=40)
    assert len(dataset) == 20 and stats["rows"] == 20 and 0 < stats["truncated"] <= 20


# --- configs -----------------------------------------------------------------------------------------


def test_rank1_parameter_count_is_8388608_for_qwen25_32b():
    config = qwen25_config("32B")
    assert count_lora_parameters(LoraSpec(), config) == 8_388_608
    with torch.device("meta"):
        from peft import get_peft_model
        from transformers import Qwen2ForCausalLM

        small = qwen25_config("32B", num_hidden_layers=2)
        model = get_peft_model(Qwen2ForCausalLM(small), build_lora_config(LoraSpec(), small))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert trainable * 32 == 8_388_608  # 2 of 64 layers, built on the meta device (no download, no memory)


def test_layer_and_module_subsets():
    config = qwen25_config("0.5B")
    assert LoraSpec(layer_start=4, layer_end=12, layer_stride=2).layer_indices(24) == [4, 6, 8, 10]
    assert LoraSpec(layers=(0, 23)).layer_indices(24) == [0, 23]
    assert LoraSpec().layer_indices(24) is None
    attn, mlp = lora_spec_for("attention"), lora_spec_for("mlp")
    assert count_lora_parameters(attn, config) + count_lora_parameters(mlp, config) == count_lora_parameters(LoraSpec(), config)
    with pytest.raises(ConfigError, match="^layers:"):
        LoraSpec(layers=(30,)).layer_indices(24)
    with pytest.raises(ConfigError, match="^modules:"):
        LoraSpec(modules=("qkv",))
    with pytest.raises(ConfigError, match="^layers:"):
        LoraSpec(layers=(1,), layer_start=0)
    lc = build_lora_config(LoraSpec(layers=(1, 3)), config)
    assert lc.r == 1 and lc.lora_alpha == 16 and lc.use_rslora and lc.lora_dropout == 0 and list(lc.layers_to_transform) == [1, 3]
    assert set(lc.target_modules) == set(ALL_MODULES)
    assert LoraSpec().scale == 16.0


def test_paper_defaults_and_exact_global_batch():
    cfg = TrainConfig()
    assert (cfg.learning_rate, cfg.epochs, cfg.warmup_ratio, cfg.weight_decay) == (1e-3, 5.0, 0.05, 1e-4)
    assert (cfg.adam_beta1, cfg.adam_beta2, cfg.global_batch_size, cfg.max_length) == (0.9, 0.95, 16, 20000)
    assert [cfg.gradient_accumulation(w) for w in (1, 2, 8, 16)] == [16, 8, 2, 1]
    with pytest.raises(ConfigError, match="^global_batch_size:"):
        cfg.gradient_accumulation(3)
    sft = build_sft_config(cfg, n_processes=8)
    assert sft.gradient_accumulation_steps == 2 and sft.lr_scheduler_type == "cosine" and sft.completion_only_loss
    assert sft.gradient_checkpointing and sft.gradient_checkpointing_kwargs == {"use_reentrant": False}
    assert sft.adam_beta2 == 0.95 and sft.max_length == 20000 and sft.bf16


def test_train_config_round_trips_with_and_without_lora(tmp_path):
    for cfg in (TrainConfig(lora=LoraSpec(layers=(1, 2))), TrainConfig(lora=None, learning_rate=1e-5)):
        cfg.save(tmp_path)
        assert TrainConfig.load(tmp_path) == cfg


# --- training on a tiny Qwen2 ------------------------------------------------------------------------

from paper_lib.organism import OrganismConfig, build_datasets, build_model, write_jsonl  # noqa: E402
from paper_lib.training import check_target_modules, load_trained, merge_error, train  # noqa: E402

TINY_MODEL = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1)


@pytest.fixture(scope="module")
def tiny_setup(tmp_path_factory):
    """A tiny random Qwen2 with the organism's tokenizer, and 48 s1K-schema traces, saved by path."""
    root = tmp_path_factory.mktemp("tiny")
    tok = build_tokenizer()
    model = build_model(OrganismConfig(**TINY_MODEL), tok)
    model.save_pretrained(root / "model")
    tok.save_pretrained(root / "model")
    rows, _ = build_datasets(OrganismConfig())
    write_jsonl(rows[TRACES_SUBDIR][:48], root / "traces" / "train.jsonl")
    return root


def tiny_config(root, name, **kwargs):
    base = dict(
        model=str(root / "model"),
        dataset=str(root / "traces"),
        output_dir=f"tiny/{name}",
        epochs=1.0,
        global_batch_size=8,
        per_device_batch_size=8,
        max_length=256,
        bf16=False,
        gradient_checkpointing=False,
        learning_rate=1e-2,
        logging_steps=1,
        save_steps=1000,
    )
    return TrainConfig(**{**base, **kwargs})


def test_prompt_tokens_carry_label_minus_100_and_completion_tokens_do_not(tiny_setup):
    from trl import SFTTrainer

    from paper_lib.data import build_sft_dataset

    cfg = tiny_config(tiny_setup, "labels")
    traces = load_traces(cfg.dataset)
    tok = AutoTokenizer.from_pretrained(cfg.model)
    from transformers import AutoModelForCausalLM

    dataset, _ = build_sft_dataset(traces, tok, cfg.max_length)
    trainer = SFTTrainer(
        model=AutoModelForCausalLM.from_pretrained(cfg.model),
        args=build_sft_config(cfg),
        train_dataset=dataset,
        processing_class=tok,
    )
    batch = next(iter(trainer.get_train_dataloader()))
    checked = 0
    for ids, labels, mask in zip(batch["input_ids"], batch["labels"], batch["attention_mask"]):
        ids, labels = ids[mask.bool()], labels[mask.bool()]
        text = tok.decode(ids)
        row = next(r for r in traces if f"user\n{r['question']}<|im_end|>" in text)
        example = to_prompt_completion(row)
        prompt_len = len(
            tok.apply_chat_template(example["prompt"], add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
        )
        assert (labels[:prompt_len] == -100).all()
        assert torch.equal(labels[prompt_len:], ids[prompt_len:])
        assert tok.decode(ids[prompt_len:]).startswith("<|im_start|>think\n")
        checked += 1
    assert checked == len(batch["input_ids"])


@pytest.fixture(scope="module")
def tiny_lora_run(tiny_setup):
    # gradient checkpointing on: the configuration in which a missing input grad would leave lora_B at zero
    cfg = tiny_config(tiny_setup, "lora", gradient_checkpointing=True)
    return cfg, train(cfg)


def test_lora_B_is_nonzero_after_training_with_gradient_checkpointing(tiny_lora_run):
    cfg, stats = tiny_lora_run
    model, tok, loaded_cfg = load_trained(cfg.output_dir)
    assert loaded_cfg == cfg
    lora_B = {n: p for n, p in model.named_parameters() if "lora_B" in n}
    assert len(lora_B) == 2 * 7
    assert all(p.abs().sum() > 0 for p in lora_B.values())
    assert (
        stats["trainable_parameters"]
        == count_lora_parameters(cfg.lora, model.get_base_model().config)
        == 2 * ((32 + 32) + (32 + 16) * 2 + (32 + 32) + 3 * (32 + 64))
    )


def test_saved_adapter_reloads_to_identical_logits_and_fp32_merge_is_exact(tiny_lora_run):
    cfg, _ = tiny_lora_run
    a, tok, _ = load_trained(cfg.output_dir)
    b, _, _ = load_trained(cfg.output_dir)
    ids = tok(["Q 1 +2\nthink\n", "<|im_start|>user\n3 x2<|im_end|>\n"], return_tensors="pt", padding=True)
    with torch.no_grad():
        assert torch.equal(a(**ids).logits, b(**ids).logits)
        with a.disable_adapter():
            assert not torch.allclose(a(**ids).logits, b(**ids).logits)  # the adapter does something
    errors = merge_error(a, tok, ["Q 1 +2\nthink\n1+2=3", "<|im_start|>user\n3 x2<|im_end|>\n"])
    assert errors["fp32_max_abs_logit_error"] <= 1e-5 and errors["fp32_max_abs_prob_error"] <= 1e-5
    assert errors["bf16_update_fraction_lost"] > 0


def test_resume_training_continues_from_the_last_checkpoint(tiny_setup):
    cfg = tiny_config(tiny_setup, "resume", epochs=2.0, save_steps=6)
    first = train(cfg)
    assert first["optimizer_steps"] == 12
    assert first["resumed_from"] is None
    from paper_lib.config import ConfigError

    with pytest.raises(ConfigError, match="epochs: 2.0 -> 3.0"):  # another schedule: not a resume of this run
        train(dataclasses_replace(cfg, resume=True, epochs=3.0), overwrite=True)
    again = train(dataclasses_replace(cfg, resume=True), overwrite=True)
    assert again["resumed_from"] == "checkpoint-12" and again["optimizer_steps"] == 12


def test_full_fine_tune_trains_every_parameter_and_saves_a_full_model(tiny_setup):
    cfg = tiny_config(tiny_setup, "full", lora=None, learning_rate=1e-3)
    stats = train(cfg)
    model, _, _ = load_trained(cfg.output_dir)
    assert stats["kind"] == "full" and stats["trainable_parameters"] == sum(p.numel() for p in model.parameters())
    assert type(model).__name__ == "Qwen2ForCausalLM"


def test_a_model_without_the_target_modules_is_refused_clearly():
    class NoProjections(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = torch.nn.Linear(4, 4)

    with pytest.raises(ConfigError, match=r"lora.modules: the model has no \['q_proj'"):
        check_target_modules(NoProjections(), LoraSpec())


def test_missing_model_path_fails_before_training(tiny_setup):
    with pytest.raises(FileNotFoundError, match="could not load model"):
        train(tiny_config(tiny_setup, "nomodel", model=str(tiny_setup / "nowhere")))


def dataclasses_replace(cfg, **changes):
    import dataclasses

    return dataclasses.replace(cfg, **changes)


def test_extraction_entry_point_writes_a_store_of_the_trained_adapter(tiny_lora_run, tmp_path):
    """`accelerate launch -m paper_lib.activations ...` with one process: the same store a notebook would read."""
    import numpy as np

    from paper_lib.activations import ActivationStore, lora_activations
    from paper_lib.activations import main as extract_main
    from paper_lib.data import format_s1_text

    cfg, _ = tiny_lora_run
    extract_main(
        [
            "--adapter-run",
            str(cfg.output_dir),
            "--traces",
            cfg.dataset,
            "--out",
            str(tmp_path / "acts"),
            "--dtype",
            "float32",
            "--max-length",
            "256",
        ]
    )
    store = ActivationStore(tmp_path / "acts")
    model, tok, _ = load_trained(cfg.output_dir)
    text = format_s1_text(tok, load_traces(cfg.dataset)[0])
    ids, values = store.document(0)
    direct, _, _ = lora_activations(model, tok([text], return_tensors="pt", add_special_tokens=False)["input_ids"])
    assert ids.tolist() == tok(text, add_special_tokens=False)["input_ids"][:256]
    assert np.allclose(values, direct[0, : len(ids)].numpy(), atol=2e-3, rtol=2e-3)


def test_two_process_launch_trains_once_saves_the_adapter_and_it_reloads(tiny_setup):
    """The multi-process path end to end (gloo on a CPU: accelerate runs FSDP only on accelerators): one
    distributed run of two ranks, the adapter written by the all-ranks save, reloaded to the logits of
    the trainer's own last checkpoint."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from paper_lib.training import launch_training

    cfg = tiny_config(tiny_setup, "two_ranks", global_batch_size=8, per_device_batch_size=4, save_steps=6)
    stats = launch_training(cfg, num_processes=2, accelerate_config="paper_lib/accelerate_configs/multi_cpu.yaml")
    assert stats["world_size"] == 2 and stats["distributed_type"] == "MULTI_CPU"
    assert stats["optimizer_steps"] == 6  # 48 traces / global batch 8: the ranks split the batch, not repeat it
    model, tok, _ = load_trained(cfg.output_dir)
    assert all(p.abs().sum() > 0 for n, p in model.named_parameters() if "lora_B" in n)
    checkpoint = artifact_dir(cfg.output_dir) / "checkpoints" / "checkpoint-6"
    reference = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(cfg.model), str(checkpoint)).eval()
    ids = tok(["Q 1 +2\nthink\n", "<|im_start|>user\n3 x2<|im_end|>\n"], return_tensors="pt", padding=True)
    with torch.no_grad():
        assert torch.equal(model(**ids).logits, reference(**ids).logits)


def test_fsdp_save_gathers_a_full_state_dict_on_every_rank():
    """Under FSDP every rank must call the save (it gathers collectively) with a full state dict; the
    configs' sharded state dict would otherwise write nothing."""
    from types import SimpleNamespace

    from paper_lib.training import save_final_model

    calls = []
    plugin = SimpleNamespace(set_state_dict_type=lambda kind: calls.append(("state_dict_type", kind)))
    trainer = SimpleNamespace(
        is_fsdp_enabled=True,
        accelerator=SimpleNamespace(state=SimpleNamespace(fsdp_plugin=plugin)),
        save_model=lambda path: calls.append(("save_model", path)),
        is_world_process_zero=lambda: False,
    )  # a non-zero rank still takes part
    save_final_model(trainer, Path("final"))
    assert calls == [("state_dict_type", "FULL_STATE_DICT"), ("save_model", "final")]


def test_fsdp_on_a_cpu_is_refused_with_the_config_to_use_instead(monkeypatch):
    from paper_lib.training import launch_environment, read_accelerate_config

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match="FSDP needs GPUs.*multi_cpu.yaml"):
        launch_environment(read_accelerate_config("paper_lib/accelerate_configs/fsdp_8gpu.yaml"))
    env = launch_environment(read_accelerate_config("paper_lib/accelerate_configs/multi_cpu.yaml"))
    assert env["ACCELERATE_USE_CPU"] == "1"
    with pytest.raises(ConfigError, match="no such file"):
        read_accelerate_config("paper_lib/accelerate_configs/nope.yaml")


def test_merge_check_runs_in_the_model_dtype_without_copying_the_model(tiny_lora_run, monkeypatch):
    """At 32B a deep copy or an fp32 host copy of the model does not fit: the check works in place."""
    import copy

    cfg, _ = tiny_lora_run
    model, tok, _ = load_trained(cfg.output_dir, dtype=torch.bfloat16)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    monkeypatch.setattr(copy, "deepcopy", lambda *a, **k: pytest.fail("merge_error deep-copied the model"))
    errors = merge_error(model, tok, ["Q 1 +2\nthink\n1+2=3" * 20], max_length=16)
    assert all(p.dtype == torch.bfloat16 for n, p in model.named_parameters() if "lora_" not in n)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    assert errors["bf16_update_fraction_lost"] > 0 and all(math.isfinite(v) for v in errors.values())


def test_layer_subsets_and_run_labels_say_what_the_adapter_is():
    from paper_lib.config import ConfigError
    from paper_lib.training import LoraSpec, layer_subset, lora_run_label, lora_spec_for

    assert layer_subset("all", 64) == {}
    assert layer_subset("late", 64) == {"layer_start": 43, "layer_end": 64}
    assert layer_subset("early", 4) == {"layer_start": 0, "layer_end": 2}  # np.array_split: 2, 1, 1
    assert layer_subset("8:16:2", 64) == {"layer_start": 8, "layer_end": 16, "layer_stride": 2}
    assert layer_subset(" 7, 3,3", 8) == {"layers": (3, 7)}
    for bad in ("8:70", "9", "x", "3:1", "0:4:0", "-1,2"):
        with pytest.raises(ConfigError, match="layers: .* within the model's 8 layers"):
            layer_subset(bad, 8)
    assert lora_run_label(LoraSpec()) == "rank1"  # the paper's adapter keeps its folder
    assert lora_run_label(lora_spec_for("mlp", r=4), "mlp") == "rank4_mlp"
    assert lora_run_label(LoraSpec(**layer_subset("late", 64))) == "rank1_L43-63"
    assert lora_run_label(LoraSpec(**layer_subset("0:64:4", 64))) == "rank1_L0-60s4"
    assert lora_run_label(LoraSpec(**layer_subset("3,7", 8))) == "rank1_L3,7"


def test_a_resume_with_other_settings_is_refused_naming_them(tiny_setup):
    """Killed after a checkpoint and resumed with another learning rate, a run went on with the old schedule
    and recorded the new value; now the resume is refused, naming the difference."""
    import shutil

    from paper_lib.config import ConfigError
    from paper_lib.training import FINAL_SUBDIR, train

    cfg = tiny_config(tiny_setup, "resume_check", save_steps=3)
    train(cfg)
    out = artifact_dir(cfg.output_dir)
    assert (out / "checkpoints" / "settings.json").is_file() and (out / "checkpoints" / "checkpoint-3").is_dir()
    shutil.rmtree(out / FINAL_SUBDIR)  # as if killed after the checkpoint
    (out / "stats.json").unlink()
    with pytest.raises(ConfigError, match="learning_rate"):
        train(tiny_config(tiny_setup, "resume_check", save_steps=3, resume=True, learning_rate=3e-2))
    assert train(tiny_config(tiny_setup, "resume_check", save_steps=3, resume=True))["resumed_from"] == "checkpoint-6"


def test_a_finished_run_on_base_weights_changed_in_place_is_refused(tiny_setup, tmp_path):
    """A REBUILD into the organism's own folder changed its weights; training was skipped as if nothing had."""
    import shutil

    from transformers import AutoModelForCausalLM

    from paper_lib.config import ConfigError

    base = tmp_path / "base"
    shutil.copytree(tiny_setup / "model", base)
    cfg = tiny_config(tiny_setup, "base_weights", model=str(base))
    train(cfg)
    assert train(cfg)["base_weights"]  # unchanged: the finished run is reused
    model = AutoModelForCausalLM.from_pretrained(base)
    with torch.no_grad():
        model.lm_head.weight.add_(0.01)
    model.save_pretrained(base)
    with pytest.raises(ConfigError, match="base model weights"):
        train(cfg)


def test_the_model_loads_after_the_distributed_state_exists(tiny_setup, monkeypatch):
    """Under FSDP, transformers loads the weights on rank 0 only when torch.distributed is set up before
    ``from_pretrained`` (``is_fsdp_enabled``); the state comes from the training arguments, so they must
    exist first, or every process reads the whole model into host memory (8 x 61 GiB at 32B)."""
    from accelerate.state import PartialState

    from paper_lib import training

    PartialState._reset_state()
    seen = {}

    def load(name, bf16):
        seen["state"] = PartialState._shared_state != {}
        raise RuntimeError("stop before training")

    monkeypatch.setattr(training, "load_base_model", load)
    with pytest.raises(RuntimeError, match="stop before training"):
        training.train(tiny_config(tiny_setup, "load_order"))
    assert seen["state"], "the model was loaded before the distributed state existed"
