"""The prepared GPU check: ``python -m paper_lib.gpu_check`` (``make gpu-check``).

One short script for a lent GPU box with no network (torch, transformers and peft present; no TRL,
datasets or vLLM): it checks that the committed organism computes the same on the GPU as on the CPU,
and measures throughput at real Qwen2.5 shapes with random weights (built from a config, nothing
downloaded). It prints a Markdown table and, with ``--json``, writes the rows for the benchmark notes
(``BENCHMARKS.md``). Later stages add rows through ``CHECKS``. ``--device cpu --shape tiny`` runs the same
code on a laptop or in the tests.
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from transformers import Qwen2ForCausalLM

from paper_lib.paths import resolve
from paper_lib.throughput import QWEN25_SHAPES, StepSetup, measure_extraction, measure_train_step, qwen25_config
from paper_lib.timing import synchronize, time_call

log = logging.getLogger(__name__)


def check_organism_parity(device: torch.device, organism_dir: str = "data/organism") -> list[dict[str, Any]]:
    """The committed organism: max |logit difference| GPU vs CPU (fp32) and greedy-output agreement."""
    from paper_lib.organism import generate_greedy, load_organism, load_probe, textbook_prompt

    model, tok, _ = load_organism(resolve(organism_dir))
    problems = load_probe(resolve(organism_dir))[::20][:32]
    prompts = [textbook_prompt(p) for p in problems]
    tok.padding_side = "left"
    batch = tok(prompts, return_tensors="pt", padding=True)
    with torch.no_grad():
        cpu_logits = model(**batch).logits
        cpu_text = generate_greedy(model, tok, prompts, max_new_tokens=64)
        model.to(device)
        dev_logits = model(**{k: v.to(device) for k, v in batch.items()}).logits.cpu()
        dev_text = generate_greedy(model, tok, prompts, max_new_tokens=64)
    mask = batch["attention_mask"].bool()
    diff = (cpu_logits - dev_logits).abs()[mask].max().item()
    same = sum(a == b for a, b in zip(cpu_text, dev_text))
    return [
        {"check": "organism logits, device vs CPU (fp32)", "value": diff, "unit": "max abs diff"},
        {"check": "organism greedy outputs identical", "value": same, "unit": f"of {len(prompts)} prompts"},
    ]


def check_forward_throughput(device: torch.device, shape: str, tokens: int, seq_len: int) -> list[dict[str, Any]]:
    """Plain forward tokens/s at a Qwen2.5 shape, random bf16 weights (fp32 on CPU), SDPA attention."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    config = qwen25_config(shape)
    with torch.device(device):
        model = Qwen2ForCausalLM(config).to(dtype).eval()
    batch = max(1, tokens // seq_len)
    ids = torch.randint(0, config.vocab_size, (batch, seq_len), device=device)

    def forward() -> None:
        with torch.no_grad():
            model(input_ids=ids, logits_to_keep=1)

    seconds = time_call(forward, device)
    n_params = sum(p.numel() for n, p in model.named_parameters() if "embed_tokens" not in n)
    rows = [{"check": f"Qwen2.5-{shape} forward, {batch}x{seq_len} tokens", "value": batch * seq_len / seconds, "unit": "tok/s"}]
    if device.type == "cuda":
        peak = {"H100": 989e12, "H200": 989e12}.get(
            next((k for k in ("H100", "H200") if k in torch.cuda.get_device_name(device)), ""), None
        )
        if peak:
            rows.append(
                {
                    "check": f"Qwen2.5-{shape} forward MFU (2N FLOPs/token, no attention)",
                    "value": 2 * n_params * batch * seq_len / seconds / peak,
                    "unit": "fraction of bf16 dense peak",
                }
            )
    return rows


def check_train_throughput(
    device: torch.device, shape: str, tokens: int, seq_len: int, compile_step: bool = True
) -> list[dict[str, Any]]:
    """Rank-1 LoRA vs full fine-tune optimizer steps at a Qwen2.5 shape, with the levers of issue 3.

    Baseline on one H200 at the 1.5B shape, 8,192 tokens a step (BENCHMARKS.md, reference rows): full FT
    27,300 tok/s; PEFT default rank-1 18,100; bf16 adapters 23,700; goal >= 36,000 (2x PEFT's default).
    """

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    setups = [
        StepSetup("full FT, checkpointing", lora=False, gradient_checkpointing=True),
        StepSetup("rank-1, PEFT default (fp32 adapters, checkpointing)", gradient_checkpointing=True),
        StepSetup("rank-1, bf16 adapters, checkpointing", adapter_dtype="model", gradient_checkpointing=True),
        StepSetup("rank-1, bf16 adapters, no checkpointing", adapter_dtype="model"),
    ]
    try:
        import liger_kernel  # noqa: F401

        setups.append(StepSetup("rank-1, bf16 adapters, no checkpointing, Liger", adapter_dtype="model", liger=True))
    except ImportError:
        log.info("liger-kernel not installed: skipping the Liger setups (carry its wheel to include them)")
    if compile_step:
        setups.append(StepSetup("rank-1, bf16 adapters, no checkpointing, torch.compile", adapter_dtype="model", compile=True))
    config = qwen25_config(shape)
    rows = []
    for setup in setups:
        try:
            r = measure_train_step(config, setup, device, tokens, seq_len, dtype)
            rows.append(
                {
                    "check": f"Qwen2.5-{shape} train step: {setup.name}",
                    "value": r["tok_per_s"],
                    "unit": "tok/s" + (f" (peak {r['peak_gib']:.1f} GiB)" if "peak_gib" in r else ""),
                }
            )
        except Exception as err:  # one lever failing (e.g. compile) must not hide the others
            rows.append({"check": f"Qwen2.5-{shape} train step: {setup.name}", "value": f"FAILED: {err}", "unit": ""})
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def check_extraction_throughput(device: torch.device, shape: str, tokens: int, seq_len: int) -> list[dict[str, Any]]:
    """Adapter-activation extraction vs the plain forward (goal: ours >= 0.95x plain; PEFT's LoRA forward
    is ~0.5x on an H200 at the 1.5B shape per BENCHMARKS.md (reference rows))."""

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    rows = measure_extraction(qwen25_config(shape), device, tokens, seq_len, dtype)
    return [
        {
            "check": f"Qwen2.5-{shape} extraction: {r['setup']}",
            "value": r["tok_per_s"],
            "unit": f"tok/s ({r['vs_plain']:.2f}x plain)",
        }
        for r in rows
    ]


def check_device_paths(device: torch.device, shape: str, seq_len: int = 512) -> list[dict[str, Any]]:
    """The rehearsal's device paths at a Qwen2.5 shape with random bf16 weights (fp32 on a CPU): a rank-1
    LoRA train step on all seven projections of every layer, the adapter saved and reloaded to identical
    logits, notebook 01's merge check and notebook 03's ablation KL run on the device beside the model.
    Needs torch, transformers and peft only (lent boxes have no TRL or vLLM)."""
    import tempfile

    from peft import PeftModel, get_peft_model

    from paper_lib.ablation import ablation_groups, ablation_kl
    from paper_lib.training import LoraSpec, build_lora_config, merge_error_on_batch

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    config = qwen25_config(shape)
    with torch.device(device):
        base = Qwen2ForCausalLM(config).to(dtype)
    model = get_peft_model(base, build_lora_config(LoraSpec(), config))
    for name, param in model.named_parameters():  # as after training: B no longer zero
        if "lora_B" in name:
            param.data.normal_(0, 0.02)
    ids = torch.randint(0, config.vocab_size, (2, seq_len), device=device)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    start = time.perf_counter()
    model.train()
    loss = model(**batch, labels=ids).loss
    loss.backward()
    optimizer.step()
    synchronize(device)
    rows = [
        {
            "check": f"Qwen2.5-{shape} device path: rank-1 train step (2 x {seq_len} tokens)",
            "value": time.perf_counter() - start,
            "unit": "s",
        }
    ]
    model.eval()
    with tempfile.TemporaryDirectory() as tmp, torch.no_grad():
        model.save_pretrained(tmp)
        reference = model(**batch).logits
        reloaded = PeftModel.from_pretrained(model.unload(), tmp).eval()  # the same base, no second copy
        same = torch.equal(reloaded(**batch).logits, reference)
    rows.append(
        {"check": f"Qwen2.5-{shape} device path: saved adapter reloads to identical logits", "value": str(same), "unit": ""}
    )
    start = time.perf_counter()
    errors = merge_error_on_batch(reloaded, {k: v[:, :128] for k, v in batch.items()})
    rows.append(
        {
            "check": f"Qwen2.5-{shape} device path: bf16 merge check on the device",
            "value": errors["bf16_update_fraction_lost"],
            "unit": f"fraction of B·A lost ({time.perf_counter() - start:.1f} s)",
        }
    )
    families = ablation_groups(reloaded)
    groups = {**dict(list(families["single"].items())[:14]), **families["kind"], **families["all"]}
    score = torch.zeros_like(ids)
    score[:, seq_len // 4 :] = 1
    start = time.perf_counter()
    kl = ablation_kl(reloaded, [{**batch, "score_mask": score}], groups)
    seconds = time.perf_counter() - start
    rows.append(
        {
            "check": f"Qwen2.5-{shape} device path: ablation KL, {len(groups)} groups on the device",
            "value": len(groups) * 2 * seq_len / seconds,
            "unit": f"tok/s (KL all adapters {kl[kl.group == 'all adapters'].kl.mean():.3g} nats)",
        }
    )
    rows += check_two_cache_generator(reloaded, shape)
    if device.type == "cuda":
        rows.append(
            {
                "check": f"Qwen2.5-{shape} device path: peak memory",
                "value": torch.cuda.max_memory_allocated(device) / 2**30,
                "unit": "GiB",
            }
        )
    return rows


def check_two_cache_generator(
    model: torch.nn.Module, shape: str, n_prompts: int = 4, new_tokens: int = 32
) -> list[dict[str, Any]]:
    """Notebooks 05-06's two-cache generator (``ScalarEngine``) on the device at the Qwen2.5 shape, prompts
    prefilled in chunks: with the identity transform it must pick the tokens plain greedy decoding picks."""
    import types

    from paper_lib.engines import ScalarEngine
    from paper_lib.organism import build_tokenizer

    tokenizer = build_tokenizer()  # any tokenizer whose ids the random model's vocabulary covers
    prompts = [f"<|im_start|>user\nquestion {i}: 12 + {i} * 7<|im_end|>\n<|im_start|>assistant\n" for i in range(n_prompts)]
    engine = ScalarEngine(model, tokenizer, {"identity": lambda x: x}, cache_tokens=1 << 14, prefill_tokens=8)
    greedy = types.SimpleNamespace(temperature=0.0)  # the one field the engine reads of a GenerationSpec
    start = time.perf_counter()
    spliced = engine.complete(prompts, [new_tokens] * n_prompts, greedy, [0] * n_prompts, False, "identity")
    seconds = time.perf_counter() - start
    device = next(model.parameters()).device
    plain = []
    with torch.no_grad():
        for prompt in prompts:
            ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)["input_ids"].to(device)
            out = model.generate(input_ids=ids, max_new_tokens=new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id)
            plain.append(tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=False))
    same = sum(text == p[: len(text)] for (text, _), p in zip(spliced, plain))
    return [
        {
            "check": f"Qwen2.5-{shape} device path: two-cache generator, identity transform = plain greedy",
            "value": same,
            "unit": f"of {n_prompts} prompts ({sum(n for _, n in spliced) / seconds:.0f} tok/s, prefill in chunks of 8)",
        }
    ]


def check_vllm_lora(device: torch.device, shape: str, n_prompts: int = 4, new_tokens: int = 16) -> list[dict[str, Any]]:
    """Notebook 02's serving path, when vLLM is installed: a random model at the Qwen2.5 shape and a rank-1
    adapter on all seven projections, saved, then served unmerged by vLLM (``LoRARequest``) beside PEFT's
    greedy decoding of the same adapter: prompts whose tokens agree, and vLLM's tokens/s. Random weights
    leave near-ties, so a few bf16 disagreements are expected; none in float32."""
    try:
        import vllm  # noqa: F401
    except ImportError:
        return [{"check": "vLLM", "value": "not installed on this box: its LoRA serving path skipped", "unit": ""}]
    import tempfile
    import types

    from peft import get_peft_model

    from paper_lib.engines import EvaluationError, VLLMEngine, check_cpu_head_size
    from paper_lib.organism import build_tokenizer
    from paper_lib.training import LoraSpec, build_lora_config

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    config = qwen25_config(shape)
    tokenizer = build_tokenizer()
    prompts = [f"<|im_start|>user\nquestion {i}: 3 * {i} + 4<|im_end|>\n<|im_start|>assistant\n" for i in range(n_prompts)]
    with tempfile.TemporaryDirectory() as tmp:
        base = Qwen2ForCausalLM(config).to(dtype)
        base.save_pretrained(f"{tmp}/model")  # before PEFT wraps its projections
        tokenizer.save_pretrained(f"{tmp}/model")
        model = get_peft_model(base, build_lora_config(LoraSpec(), config))
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.data.normal_(0, 0.02)
        model.save_pretrained(f"{tmp}/adapter")
        model.to(device).eval()
        plain = []
        with torch.no_grad():
            for prompt in prompts:
                ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)["input_ids"].to(device)
                out = model.generate(
                    input_ids=ids, max_new_tokens=new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id
                )
                plain.append(out[0, ids.shape[1] :].tolist())
        del model
        greedy = types.SimpleNamespace(temperature=0.0, top_p=1.0)
        try:
            if device.type == "cpu":
                check_cpu_head_size(f"{tmp}/model")
        except EvaluationError as err:  # vLLM's CPU kernels take some head sizes only (the tiny test shape's is not one)
            return [{"check": f"Qwen2.5-{shape} vLLM rank-1 LoRA", "value": "skipped", "unit": str(err).split(": ", 1)[-1]}]
        with VLLMEngine(
            f"{tmp}/model", {"rank1": f"{tmp}/adapter"}, dtype=str(dtype).split(".")[-1], max_model_len=256
        ) as engine:
            start = time.perf_counter()
            served = engine.complete(prompts, [new_tokens] * n_prompts, greedy, [0] * n_prompts, False, "rank1")
            seconds = time.perf_counter() - start
    texts = [tokenizer.decode(p, skip_special_tokens=False) for p in plain]
    same = sum(text == t[: len(text)] for (text, _), t in zip(served, texts))
    return [
        {
            "check": f"Qwen2.5-{shape} vLLM rank-1 LoRA unmerged = PEFT greedy",
            "value": same,
            "unit": f"of {n_prompts} prompts ({n_prompts * new_tokens / seconds:.0f} tok/s served)",
        }
    ]


CHECKS: list[Callable[[argparse.Namespace, torch.device], list[dict[str, Any]]]] = [
    lambda args, device: check_organism_parity(device),
    lambda args, device: check_device_paths(device, args.shape, min(args.seq_len, 512)),
    lambda args, device: check_vllm_lora(device, args.shape),
    lambda args, device: check_forward_throughput(device, args.shape, args.tokens, args.seq_len),
    lambda args, device: check_extraction_throughput(device, args.shape, args.tokens, args.seq_len),
    lambda args, device: check_train_throughput(device, args.shape, args.tokens, args.seq_len, not args.no_compile),
]


def run_checks(args: argparse.Namespace) -> list[dict[str, Any]]:
    device = torch.device(args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    rows: list[dict[str, Any]] = [
        {
            "check": "device",
            "value": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
            "unit": "",
        },
        {"check": "torch", "value": torch.__version__, "unit": ""},
    ]
    for check in CHECKS:
        start = time.perf_counter()
        try:
            rows += check(args, device)
        except Exception as err:  # a failed check is a row, not the end of the whole run
            log.exception("check failed")
            rows.append({"check": getattr(check, "__name__", "check"), "value": f"FAILED: {err}", "unit": ""})
        log.info("check took %.1f s", time.perf_counter() - start)
    return rows


def format_table(rows: list[dict[str, Any]]) -> str:
    lines = ["| check | value | unit |", "|---|---|---|"]
    for row in rows:
        value = row["value"]
        text = f"{value:,.4g}" if isinstance(value, float) else str(value)
        lines.append(f"| {row['check']} | {text} | {row['unit']} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description="prepared GPU check")
    parser.add_argument("--device", default="auto", help="auto, cuda, cuda:N or cpu")
    parser.add_argument("--shape", default="1.5B", choices=sorted(QWEN25_SHAPES))
    parser.add_argument("--tokens", type=int, default=8192, help="tokens per throughput step")
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--json", type=Path, default=None, help="also write the rows here")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile setups (slow to build)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    rows = run_checks(args)
    table = format_table(rows)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")
    sys.stdout.write(table + "\n")  # a command-line entry point: the table is its output
    return table


if __name__ == "__main__":
    main()
