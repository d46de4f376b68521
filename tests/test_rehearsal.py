"""The rehearsal: Qwen2.5's tokenizer built offline, the stand-in's geometry and schemas, and notebooks
01-06 run end to end at paper geometry with the README's real-scale parameters (sizes shrunk)."""

import json

import pytest
from transformers import AutoTokenizer

from paper_lib.rehearsal import (
    QWEN25_ADDED_TOKENS,
    build_qwen25_tokenizer,
    build_standin,
    rehearsal_parameters,
    run_rehearsal,
)


@pytest.fixture(scope="module")
def qwen_tokenizer():
    return build_qwen25_tokenizer()


def test_qwen25_tokenizer_has_qwens_ids_and_round_trips(qwen_tokenizer, tmp_path):
    tok = qwen_tokenizer
    assert tok("Hello, world!")["input_ids"] == [9707, 11, 1879, 0]  # Qwen2.5's own encoding
    assert len(tok) == 151665
    assert tok.convert_tokens_to_ids(list(QWEN25_ADDED_TOKENS)) == list(range(151643, 151665))
    assert (tok.eos_token, tok.pad_token) == ("<|im_end|>", "<|endoftext|>")
    assert len(tok("12345", add_special_tokens=False)["input_ids"]) == 5  # Qwen splits digits one by one
    text = "<|im_start|>user\nWhat is 2^10? ünïcødé 你好\t\ttabs\n\n\n  spaces<|im_end|>\n"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == text and ids[0] == 151644
    tok.save_pretrained(tmp_path)
    again = AutoTokenizer.from_pretrained(tmp_path)
    assert again(text, add_special_tokens=False)["input_ids"] == ids


def test_qwen25_chat_template_adds_the_default_system_prompt(qwen_tokenizer):
    text = qwen_tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert text == (
        "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    )


def test_standin_has_the_papers_geometry_and_the_hub_schemas(tmp_path):
    from paper_lib.data import load_traces
    from paper_lib.evaluation import load_benchmark

    root = build_standin(tmp_path / "standin", num_layers=4)
    config = json.loads((root / "model" / "config.json").read_text())
    assert config["vocab_size"] == 152064 and not config["tie_word_embeddings"] and config["dtype"] == "bfloat16"
    full = build_standin(tmp_path / "full")
    assert json.loads((full / "model" / "config.json").read_text())["num_hidden_layers"] == 64  # 448 adapters
    traces = load_traces(str(root / "s1K-1.1"))
    tok = AutoTokenizer.from_pretrained(root / "model")
    lengths = [len(tok(r["deepseek_thinking_trajectory"])["input_ids"]) for r in traces]
    max_length = rehearsal_parameters(root)["01"]["MAX_LENGTH"]
    assert min(lengths) < max_length < max(lengths) and max(lengths) > 2000  # some traces over MAX_LENGTH
    assert all(len(load_benchmark(n, str(root / n))) > 0 for n in ("aime24", "math500"))
    gpqa = load_benchmark("gpqa_diamond", str(root / "gpqa_diamond"), choice_style="s1")
    assert gpqa[0].question.startswith("What is the correct answer to this question:")


@pytest.mark.slow
def test_rehearsal_runs_notebooks_01_to_06_at_paper_geometry(tmp_path):
    """Notebook 01 through a two-process launch in bf16, 02 with MAX_MODEL_LEN = MAX_TOKENS (a random
    model writes until the context is full: the clamp must hold), 03 over 448 adapters, 04 with three
    populations of 448 features from one pass and a vLLM judge, 05 with a 3,584-latent SAE, 06 streamed."""
    import os

    figures_before = os.environ.get("PAPER_FIGURES_DIR")
    minutes = run_rehearsal(tmp_path)
    assert set(minutes) == {
        "01_train_rank1_lora",
        "02_evaluate_reasoning",
        "03_ablate_adapters",
        "04_interpret_lora_activations",
        "05_train_sae",
        "06_interpret_sae_features",
    }
    assert os.environ.get("PAPER_FIGURES_DIR") == figures_before  # redirected only while it ran
    headlines = json.loads((tmp_path / "figures" / "headline_numbers.json").read_text())
    stats = json.loads((tmp_path / "data" / "runs" / "01_train" / "rank1" / "stats.json").read_text())
    assert stats["world_size"] == 2 and stats["data_truncated"] > 0
    from safetensors import safe_open

    with safe_open(str(tmp_path / "data" / "runs" / "01_train" / "rank1" / "final" / "adapter_model.safetensors"), "pt") as f:
        assert len([k for k in f.keys() if "lora_A" in k]) == 448
        assert any(f.get_tensor(k).abs().sum() > 0 for k in f.keys() if "lora_B" in k)
    evaluation = headlines["02_evaluate_reasoning"]
    cut = sum(v["value"] for k, v in evaluation.items() if k.endswith("rank1_thinking_cut"))
    assert cut > 0  # runaway traces filled the context and were forced to answer, not crashed
    ablations = headlines["03_ablate_adapters"]
    assert len([k for k in ablations if k.startswith("kl_layer_")]) == 64
    for name in ("training_loss", "benchmark_recovery", "adapter_ablations"):
        assert (tmp_path / "figures" / f"{name}.png").is_file()
    runs = tmp_path / "data" / "runs"
    meta = json.loads((runs / "04_interpret" / "activations" / "meta.json").read_text())
    assert len(meta["layers"]) * len(meta["modules"]) == 448
    assert {k: len(v["names"]) for k, v in meta["populations"].items()} == {"MLP neuron": 448, "random direction": 448}
    for population in ("lora", "mlp", "random"):  # N_JUDGE_FEATURES 2, every record with detection and rating
        records = [
            json.loads(line) for line in (runs / "04_interpret" / "judge" / f"{population}.jsonl").read_text().splitlines()
        ]
        assert len(records) == 2 and all(r["n"] >= 5 and "rating" in r for r in records)
    assert len((runs / "04_interpret" / "judge" / "cache.jsonl").read_text().splitlines()) >= 3 * 2 * 2
    sae_cfg = json.loads((runs / "05_sae" / "sae" / "cfg.json").read_text())
    assert sae_cfg["d_in"] == 448 and sae_cfg["d_sae"] == 3584
    assert (runs / "05_sae" / "checkpoints" / "run.json").is_file()
    assert "live_latents" in headlines["06_interpret_sae_features"]
    assert (runs / "06_sae_features" / "judge_categories.csv").is_file()
    for name in ("lora_feature_examples.html", "sae_training.png", "sae_splice.png", "sae_feature_dashboard.html"):
        assert (tmp_path / "figures" / name).is_file()
