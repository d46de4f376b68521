"""Training-step throughput: rank-1 LoRA vs full fine-tune, with the levers that matter on a GPU.

``python -m paper_lib.throughput`` (``make bench-train``) times optimizer steps on random token ids
(loss = next-token cross-entropy on every position), on the organism's shape on CPU by default, or at a
Qwen2.5 shape on a GPU (the GPU check calls ``measure_train_step`` the same way). Levers: adapter dtype
(PEFT keeps adapters in fp32 by default), gradient checkpointing, Liger kernels (when installed), and
``torch.compile``.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
import time
from collections.abc import Callable
from typing import Any

import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from paper_lib.timing import time_call
from paper_lib.training import LoraSpec, build_lora_config

# Qwen2.5 shapes (from the published configs), for random-weight throughput runs.
QWEN25_SHAPES: dict[str, dict[str, int]] = {
    "tiny": dict(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, vocab_size=512
    ),
    "small": dict(
        hidden_size=512,
        intermediate_size=2048,
        num_hidden_layers=8,
        num_attention_heads=8,
        num_key_value_heads=2,
        vocab_size=4096,
    ),  # a CPU benchmark shape: compute-bound enough to show kernel costs
    "0.5B": dict(
        hidden_size=896,
        intermediate_size=4864,
        num_hidden_layers=24,
        num_attention_heads=14,
        num_key_value_heads=2,
        vocab_size=151936,
    ),
    "1.5B": dict(
        hidden_size=1536,
        intermediate_size=8960,
        num_hidden_layers=28,
        num_attention_heads=12,
        num_key_value_heads=2,
        vocab_size=151936,
    ),
    "7B": dict(
        hidden_size=3584,
        intermediate_size=18944,
        num_hidden_layers=28,
        num_attention_heads=28,
        num_key_value_heads=4,
        vocab_size=152064,
    ),
    "32B": dict(
        hidden_size=5120,
        intermediate_size=27648,
        num_hidden_layers=64,
        num_attention_heads=40,
        num_key_value_heads=8,
        vocab_size=152064,
    ),
}


def qwen25_config(shape: str, **overrides: Any) -> Qwen2Config:
    """A Qwen2.5 config of the named size (no download)."""
    if shape not in QWEN25_SHAPES:
        raise ValueError(f"unknown shape {shape!r}; known: {sorted(QWEN25_SHAPES)}")
    return Qwen2Config(**{**QWEN25_SHAPES[shape], "max_position_embeddings": 32768, "tie_word_embeddings": False, **overrides})


@dataclasses.dataclass(frozen=True)
class StepSetup:
    """One configuration to time."""

    name: str
    lora: bool = True
    adapter_dtype: str = "float32"  # PEFT's default keeps adapters in fp32 even on a bf16 base
    gradient_checkpointing: bool = False
    liger: bool = False
    compile: bool = False


DEFAULT_SETUPS = (
    StepSetup("full fine-tune", lora=False),
    StepSetup("rank-1 LoRA, PEFT default (fp32 adapters)"),
    StepSetup("rank-1 LoRA, adapters in model dtype", adapter_dtype="model"),
)


def build_for_step(config: Qwen2Config, setup: StepSetup, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """A random-weight model ready for training steps under ``setup``."""
    if setup.liger:
        from liger_kernel.transformers import apply_liger_kernel_to_qwen2

        apply_liger_kernel_to_qwen2()
    with torch.device(device):
        model = Qwen2ForCausalLM(config).to(dtype)
    if setup.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    if setup.lora:
        from peft import get_peft_model

        model = get_peft_model(model, build_lora_config(LoraSpec(), config))
        if setup.adapter_dtype == "model":
            for name, param in model.named_parameters():
                if "lora_" in name:
                    param.data = param.data.to(dtype)
    model.train()
    if setup.compile:
        model = torch.compile(model)
    return model


def measure_train_step(
    config: Qwen2Config,
    setup: StepSetup,
    device: torch.device,
    tokens: int,
    seq_len: int,
    dtype: torch.dtype = torch.float32,
    warmup: int = 2,
    repeats: int = 5,
) -> dict[str, Any]:
    """Median tokens/s of full optimizer steps (forward, backward, AdamW) and peak memory on CUDA."""
    model = build_for_step(config, setup, device, dtype)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-5, betas=(0.9, 0.95), weight_decay=1e-4)
    batch = max(1, tokens // seq_len)
    ids = torch.randint(0, config.vocab_size, (batch, seq_len), device=device)
    autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)

    def step() -> None:
        with autocast:
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    seconds = time_call(step, device, warmup=warmup, repeats=repeats)
    row = {
        "setup": setup.name,
        "tokens_per_step": batch * seq_len,
        "tok_per_s": batch * seq_len / seconds,
        "trainable": sum(p.numel() for p in params),
    }
    if device.type == "cuda":
        row["peak_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    return row


def measure_extraction(
    config: Qwen2Config, device: torch.device, tokens: int, seq_len: int, dtype: torch.dtype = torch.float32, repeats: int = 5
) -> list[dict[str, Any]]:
    """Tokens/s of adapter-activation extraction against the plain forward it rides on (random weights,
    a rank-1 adapter on all seven projections with non-zero B; no logits beyond the last position).

    Rows: plain forward (no adapter); PEFT LoRA forward; PEFT + hooks on lora_A (``lora_activations``);
    ours (``build_readout_model``) fused and merged, each without and with reading the scalars out to
    CPU, so capture overhead = forward-only / with-capture of the same model."""
    import copy

    from peft import get_peft_model

    from paper_lib.activations import build_readout_model, lora_activations

    with torch.device(device):
        base = Qwen2ForCausalLM(config).to(dtype).eval()
    peft_model = get_peft_model(copy.deepcopy(base), build_lora_config(LoraSpec(), config))
    for name, param in peft_model.named_parameters():
        if "lora_B" in name:
            param.data.normal_(0, 0.01)
    peft_model.eval()
    batch = max(1, tokens // seq_len)
    ids = torch.randint(0, config.vocab_size, (batch, seq_len), device=device)

    def forward(model: torch.nn.Module) -> Callable[[], None]:
        return lambda: model(input_ids=ids, logits_to_keep=1)

    def extract(model: torch.nn.Module) -> Callable[[], None]:
        return lambda: lora_activations(model, ids)

    setups: list[tuple[str, Callable[[], None]]] = [
        ("plain forward (no adapter)", forward(base)),
        ("PEFT LoRA forward", forward(peft_model)),
        ("PEFT LoRA + hooks, scalars to CPU", extract(peft_model)),
    ]
    for merged in (False, True):
        readout = build_readout_model(copy.deepcopy(peft_model), merged=merged)
        name = "ours, merged" if merged else "ours, fused (unmerged arithmetic)"
        setups += [(f"{name}, forward only", forward(readout)), (f"{name}, scalars to CPU", extract(readout))]
    rows = []
    with torch.no_grad():
        for name, fn in setups:
            seconds = time_call(fn, device, warmup=2, repeats=repeats)
            rows.append({"setup": name, "tok_per_s": batch * seq_len / seconds})
    plain = rows[0]["tok_per_s"]
    for row in rows:
        row["vs_plain"] = row["tok_per_s"] / plain
    return rows


def organism_config() -> Qwen2Config:
    """The committed organism's architecture (random weights are enough for timing)."""
    from paper_lib.organism import OrganismConfig, build_model, build_tokenizer

    return build_model(OrganismConfig(), build_tokenizer()).config


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(description="rank-1 LoRA vs full fine-tune step throughput")
    parser.add_argument(
        "--shape", default="organism", help="organism, or a Qwen2.5 size (0.5B, 1.5B, 7B, 32B; small and tiny for CPU)"
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--extraction", action="store_true", help="instead: adapter-activation extraction vs plain forward")
    parser.add_argument(
        "--evaluation",
        action="store_true",
        help="instead: notebook 02's generation on the organism, a batch at a time vs one request set (vLLM)",
    )
    parser.add_argument(
        "--generation",
        metavar="RUN_DIR",
        default=None,
        help="instead: generation throughput of notebook 01's rank-1 run (e.g. runs/01_train/rank1)",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    if args.generation:
        return main_generation(args.generation)
    if args.evaluation:
        rows = measure_evaluation()
        lines = [f"organism, notebook 02's protocols, fp32, threads={torch.get_num_threads()}", "| setup | s | tokens | tok/s |"]
        lines += ["|---|---|---|---|"] + [
            f"| {r['setup']} | {r['seconds']:.1f} | {r['tokens']:,} | {r['tok_per_s']:,.0f} |" for r in rows
        ]
        after = rows[1]
        lines += [f"ratio {after['ratio']:.2f}x; alike {after['alike']}; accuracy before/after {after['accuracy']}"]
        sys.stdout.write("\n".join(lines) + "\n")  # a command-line entry point: the table is its output
        return rows
    device = torch.device(args.device)
    if args.shape == "organism":
        config = organism_config()
    else:
        config = qwen25_config(args.shape)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if args.extraction:
        rows = measure_extraction(config, device, args.tokens, args.seq_len, dtype)
        lines = [
            f"shape={args.shape} device={device} tokens/forward={args.tokens} threads={torch.get_num_threads()}",
            "| setup | tok/s | vs plain forward |",
            "|---|---|---|",
        ]
        lines += [f"| {r['setup']} | {r['tok_per_s']:,.0f} | {r['vs_plain']:.2f}x |" for r in rows]
        sys.stdout.write("\n".join(lines) + "\n")  # a command-line entry point: the table is its output
        return rows
    rows = [measure_train_step(config, s, device, args.tokens, args.seq_len, dtype) for s in DEFAULT_SETUPS]
    full = rows[0]["tok_per_s"]
    lines = [
        f"shape={args.shape} device={device} tokens/step={rows[0]['tokens_per_step']} threads={torch.get_num_threads()}",
        "| setup | tok/s | vs full | trainable |",
        "|---|---|---|---|",
    ]
    lines += [f"| {r['setup']} | {r['tok_per_s']:,.0f} | {r['tok_per_s'] / full:.2f}x | {r['trainable']:,} |" for r in rows]
    sys.stdout.write("\n".join(lines) + "\n")  # a command-line entry point: the table is its output
    return rows


def measure_generation(
    model_dir: str, adapter_dir: str, merged_dir: str, n_prompts: int = 64, new_tokens: int = 128
) -> list[dict[str, Any]]:
    """Greedy generation tokens/s on the same prompts and lengths: HF ``generate`` vs vLLM, and in vLLM the
    rank-1 adapter served unmerged vs merged into the weights. Every run generates exactly ``new_tokens``
    per prompt (end-of-text ignored) so the token counts are equal."""
    import os

    from vllm import LLM, SamplingParams
    from vllm.lora.request import LoRARequest

    from paper_lib.engines import HFEngine
    from paper_lib.formats import chat_prompt
    from paper_lib.organism import load_probe
    from paper_lib.paths import resolve

    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    problems = load_probe(resolve("data/organism"))[::7][:n_prompts]
    hf = HFEngine(model_dir, {"rank1": adapter_dir}, batch_size=n_prompts)
    prompts = [chat_prompt(hf.tokenizer, p.question) for p in problems]
    rows = []
    batch = hf.tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    hf.model.set_adapter("rank1")
    start = time.perf_counter()
    with torch.no_grad():
        hf.model.generate(
            **batch, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=hf.tokenizer.pad_token_id
        )
    rows.append(
        {"setup": "HF generate, PEFT adapter unmerged", "tok_per_s": n_prompts * new_tokens / (time.perf_counter() - start)}
    )
    del hf
    params = SamplingParams(temperature=0.0, max_tokens=new_tokens, ignore_eos=True)
    common = dict(dtype="float32", max_model_len=512, enforce_eager=True, kv_cache_memory_bytes=2**30)
    llm = LLM(model=str(resolve(model_dir)), enable_lora=True, max_lora_rank=1, **common)
    lora = LoRARequest("rank1", 1, str(resolve(adapter_dir)))
    llm.generate(prompts[:2], params, lora_request=lora, use_tqdm=False)  # warm-up
    start = time.perf_counter()
    llm.generate(prompts, params, lora_request=lora, use_tqdm=False)
    rows.append(
        {
            "setup": "vLLM, rank-1 adapter unmerged (LoRARequest)",
            "tok_per_s": n_prompts * new_tokens / (time.perf_counter() - start),
        }
    )
    del llm
    llm = LLM(model=str(resolve(merged_dir)), **common)
    llm.generate(prompts[:2], params, use_tqdm=False)
    start = time.perf_counter()
    llm.generate(prompts, params, use_tqdm=False)
    rows.append({"setup": "vLLM, adapter merged (fp32)", "tok_per_s": n_prompts * new_tokens / (time.perf_counter() - start)})
    return rows


def measure_evaluation(model_dir: str = "data/organism/model", benchmark_dir: str = "data/organism") -> list[dict[str, Any]]:
    """Notebook 02's generation on the organism, the way evaluation drove vLLM before (a batch of 32
    questions at a time, every phase waiting for its slowest response) and now (one request set that
    vLLM schedules continuously), on one engine in one run: generated tokens/s of each, and how many
    samples came out word for word alike. Greedy budget-forced protocol on the three benchmarks, then
    pass@1 (4 samples) on AIME24, at notebook 02's organism settings."""
    import tempfile

    from paper_lib.engines import VLLMEngine
    from paper_lib.evaluation import GenerationSpec, evaluate, load_benchmark

    class Lockstep:
        """The engine without ``enqueue``: evaluation falls back to a batch at a time, as it ran before."""

        def __init__(self, engine: VLLMEngine) -> None:
            self.engine, self.tokenizer, self.max_model_len = engine, engine.tokenizer, engine.max_model_len

        def complete(self, *args: Any) -> list[tuple[str, int]]:
            return self.engine.complete(*args)

        def identity(self, variant: str | None) -> dict[str, Any]:
            return self.engine.identity(variant)

    greedy = GenerationSpec(max_tokens=160, answer_tokens=32)
    sampled = GenerationSpec(temperature=0.6, top_p=0.95, n=4, max_tokens=160, answer_tokens=32)
    names = {"aime24": "aime24", "math500": "math500", "gpqa_diamond": "gpqa_diamond"}
    benchmarks = {n: load_benchmark(n, f"{benchmark_dir}/{d}", choice_style="organism") for n, d in names.items()}
    jobs = [(f"{n}.greedy", items, greedy) for n, items in benchmarks.items()] + [
        ("aime24.sampled", benchmarks["aime24"], sampled)
    ]
    rows = []
    with VLLMEngine(model_dir, dtype="float32", max_model_len=512) as engine, tempfile.TemporaryDirectory() as tmp:
        evaluate(engine, benchmarks["aime24"][:4], greedy, f"{tmp}/warmup.jsonl")
        for setup, driver in (
            ("before: 32 questions a batch, phase by phase", Lockstep(engine)),
            ("after: one request set", engine),
        ):
            frames, start = [], time.perf_counter()
            for name, items, spec in jobs:
                frames.append(evaluate(driver, items, spec, f"{tmp}/{len(rows)}/{name}.jsonl", chunk=32 * spec.n))
            seconds = time.perf_counter() - start
            tokens = sum(int(f["tokens"].sum()) for f in frames)
            rows.append({"setup": setup, "seconds": seconds, "tokens": tokens, "tok_per_s": tokens / seconds, "frames": frames})
    before, after = (r.pop("frames") for r in rows)
    alike = [(a["response"] == b["response"]).sum() for a, b in zip(before, after)]
    total = sum(len(a) for a in before)
    rows[1]["ratio"] = rows[1]["tok_per_s"] / rows[0]["tok_per_s"]
    rows[1]["alike"] = f"{sum(alike[:3])}/{sum(len(a) for a in before[:3])} greedy, {alike[3]}/{len(before[3])} sampled"
    rows[1]["accuracy"] = {
        j[0]: (round(a["correct"].mean(), 4), round(b["correct"].mean(), 4)) for j, a, b in zip(jobs, before, after)
    }
    rows[1]["samples"] = total
    return rows


def main_generation(run_dir: str) -> list[dict[str, Any]]:
    """Merge the run's adapter in fp32 into a scratch folder, then time the three serving setups."""
    import tempfile

    from paper_lib.paths import artifact_dir
    from paper_lib.training import FINAL_SUBDIR, load_trained

    model, tokenizer, cfg = load_trained(run_dir)
    with tempfile.TemporaryDirectory() as merged:
        model.merge_and_unload().save_pretrained(merged)
        tokenizer.save_pretrained(merged)
        rows = measure_generation(cfg.model, str(artifact_dir(run_dir) / FINAL_SUBDIR), merged)
    lines = [f"64 prompts x 128 new tokens, greedy, fp32, threads={torch.get_num_threads()}", "| setup | tok/s |", "|---|---|"]
    lines += [f"| {r['setup']} | {r['tok_per_s']:,.0f} |" for r in rows]
    sys.stdout.write("\n".join(lines) + "\n")  # a command-line entry point: the table is its output
    return rows


if __name__ == "__main__":
    main()
