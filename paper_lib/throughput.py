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
from typing import Any

import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from paper_lib.training import LoraSpec, build_lora_config

log = logging.getLogger(__name__)


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
    config: Qwen2Config, setup: StepSetup, device: torch.device, tokens: int, seq_len: int,
    dtype: torch.dtype = torch.float32, warmup: int = 2, repeats: int = 5,
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
    for _ in range(warmup):
        step()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    seconds = sorted(times)[len(times) // 2]
    row = {"setup": setup.name, "tokens_per_step": batch * seq_len, "tok_per_s": batch * seq_len / seconds,
           "trainable": sum(p.numel() for p in params)}
    if device.type == "cuda":
        row["peak_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    del model, optimizer
    return row


def organism_config() -> Qwen2Config:
    """The committed organism's architecture (random weights are enough for timing)."""
    from paper_lib.organism import OrganismConfig, build_model, build_tokenizer

    return build_model(OrganismConfig(), build_tokenizer()).config


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(description="rank-1 LoRA vs full fine-tune step throughput")
    parser.add_argument("--shape", default="organism", help="organism, or a Qwen2.5 size (0.5B, 1.5B, 7B, 32B)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--seq-len", type=int, default=128)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    device = torch.device(args.device)
    if args.shape == "organism":
        config = organism_config()
    else:
        from paper_lib.gpu_check import qwen25_config

        config = qwen25_config(args.shape)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    rows = [measure_train_step(config, s, device, args.tokens, args.seq_len, dtype) for s in DEFAULT_SETUPS]
    full = rows[0]["tok_per_s"]
    lines = [f"shape={args.shape} device={device} tokens/step={rows[0]['tokens_per_step']} threads={torch.get_num_threads()}",
             "| setup | tok/s | vs full | trainable |", "|---|---|---|---|"]
    lines += [f"| {r['setup']} | {r['tok_per_s']:,.0f} | {r['tok_per_s'] / full:.2f}x | {r['trainable']:,} |" for r in rows]
    sys.stdout.write("\n".join(lines) + "\n")  # a command-line entry point: the table is its output
    return rows


if __name__ == "__main__":
    main()
