"""Plan a notebook run at real scale before paying for GPUs: peak memory per device and time, by arithmetic.

``python -m paper_lib.plan NOTEBOOK --model MODEL --gpus N --gpu-gib G [-p NAME VALUE ...]`` reads the
notebook's parameters as papermill would (its own defaults, then the ``-p`` values), works out each
expensive stage's peak memory on one device from the model's shapes, prints a table, and exits non-zero
when a stage does not fit, naming the parameter to change and a value that fits.

Memory is a model, not a measurement: a CPU cannot rehearse a 32B model's memory. Its terms, each one
line below, are calibrated on the measured rows of BENCHMARKS.md (``CALIBRATION``; a test holds every
row within 15%):

- weights: parameters x 2 bytes (bf16), split over the GPUs under FSDP or tensor parallelism;
- activations kept for the backward pass: every layer's (16 h + 6 i) bytes a token without gradient
  checkpointing; with it, the layer inputs (2 h bytes a token a layer) plus one layer recomputed
  (1.5 x (16 h + 6 i) bytes a token);
- the logits and their gradient: 11.4 bytes per token x vocabulary entry, unless Liger's fused loss
  never builds them;
- PEFT's default float32 adapters: the inputs cast to float32 on the LoRA path, (6 h + i) x 4 bytes a
  token per layer held;
- a forward pass without gradient (ablations, extraction, the splice): one layer's temporaries, (4 h + 3 i)
  x 2 bytes a token, and float32 adapter inputs (6 h + i) x 4 bytes a token when adapters run in float32;
  logits for the scored positions in chunks; the KV cache only if ``use_cache`` is on;
- a KV cache: 2 x layers x KV heads x head size x 2 bytes a token (256 KiB at 32B).

Time: a training step at the reference rate of BENCHMARKS.md (tokens/s per GPU at that shape); decode
bound by reading the weights and the KV cache from GPU memory once per generated token of a batch
(``HBM_TB_S``), not by the forward rate, which is said in the table.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from collections.abc import Callable, Sequence
from typing import Any

GiB = 2**30
LOGIT_BYTES = 11.4  # per token x vocabulary entry: bf16 logits, their float32 upcast and gradient (calibrated)
RECOMPUTE = 1.5  # one layer recomputed under checkpointing, and its gradients (calibrated)
HBM_TB_S = {"H100": 3.35, "H200": 4.8}  # GPU memory bandwidth, TB/s
PEAK_TFLOPS = 989.0  # dense bf16 of an H100 or H200 (same compute; the H200 has more and faster memory)
HBM_EFFICIENCY = 0.7  # the fraction of the bandwidth a decode step reaches (assumed, not yet measured)
FSDP_SCALING = 0.8  # throughput a GPU keeps under FSDP over several (assumed)
STATIC_BATCH_EFFICIENCY = 0.5  # busy slots of a static generation batch that runs until its longest response (assumed)
# Assumed mean response lengths at real scale (R1-style traces; s1.1-32B's own lengths), capped by MAX_TOKENS
RESPONSE_TOKENS = {"aime24": 16_000, "math500": 4_000, "gpqa_diamond": 8_000}
QUESTIONS = {"aime24": 30, "math500": 500, "gpqa_diamond": 198}
S1K_TOKENS = 10_000_000  # s1K-1.1's tokens an epoch (1,000 traces of ~10k tokens, Qwen2.5's tokenizer)


@dataclasses.dataclass(frozen=True)
class Shape:
    """A decoder's sizes: what memory and time depend on."""

    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int
    tied: bool

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    @property
    def params(self) -> int:
        h, kv = self.hidden, self.kv_heads * self.head_dim
        layer = 2 * h * h + 2 * h * kv + 3 * h * self.intermediate + (h + 2 * kv) + 2 * h  # projections, q/k/v biases, norms
        return self.layers * layer + self.vocab * h * (1 if self.tied else 2) + h

    @property
    def kv_bytes(self) -> int:
        """KV cache bytes a token (bf16), all layers."""
        return 2 * self.layers * self.kv_heads * self.head_dim * 2

    @property
    def layer_bytes(self) -> int:
        """Activations a layer keeps for backward, bytes a token (bf16)."""
        return 16 * self.hidden + 6 * self.intermediate

    @property
    def adapter_input_bytes(self) -> int:
        """Float32 adapter inputs a layer (PEFT's default dtype for adapters), bytes a token."""
        return (6 * self.hidden + self.intermediate) * 4


# The Qwen2.5 family (the models' config.json), so a plan needs no download.
QWEN25 = {
    "0.5B": Shape(896, 4864, 24, 14, 2, 151936, True),
    "1.5B": Shape(1536, 8960, 28, 12, 2, 151936, True),
    "3B": Shape(2048, 11008, 36, 16, 2, 151936, True),
    "7B": Shape(3584, 18944, 28, 28, 4, 152064, False),
    "14B": Shape(5120, 13824, 48, 40, 8, 152064, False),
    "32B": Shape(5120, 27648, 64, 40, 8, 152064, False),
    "72B": Shape(8192, 29568, 80, 64, 8, 152064, False),
}


def shape_of(model: str) -> Shape:
    """The shapes of ``model``: a Qwen2.5 size named in it (``Qwen/Qwen2.5-32B-Instruct``), else a local
    folder's ``config.json``."""
    for size in sorted(QWEN25, key=len, reverse=True):
        if f"-{size}" in model:
            return QWEN25[size]
    from paper_lib.paths import resolve

    config = resolve(model) / "config.json"
    if not config.is_file():
        raise ValueError(f"{model}: not a Qwen2.5 size ({', '.join(QWEN25)}) and no local config.json")
    c = json.loads(config.read_text())
    return Shape(
        c["hidden_size"],
        c["intermediate_size"],
        c["num_hidden_layers"],
        c["num_attention_heads"],
        c.get("num_key_value_heads", c["num_attention_heads"]),
        c["vocab_size"],
        bool(c.get("tie_word_embeddings", False)),
    )


def training_bytes(
    shape: Shape, tokens: int, lora: bool, checkpointing: bool, liger: bool, gpus: int = 1, fp32_adapters: bool = False
) -> float:
    """Peak bytes on one device of a training step over ``tokens`` tokens (one sequence a device)."""
    weights = shape.params * 2
    state = 0 if lora else shape.params * 14  # bf16 gradients, float32 master weights and two Adam moments
    per_device = (weights + state) / gpus + (shape.params * 2 / shape.layers if gpus > 1 else 0)  # FSDP gathers a layer
    kept = shape.layers * tokens * (2 * shape.hidden if checkpointing else shape.layer_bytes)
    recompute = RECOMPUTE * tokens * shape.layer_bytes if checkpointing else 0
    logits = 0 if liger else tokens * shape.vocab * LOGIT_BYTES
    adapters = tokens * shape.adapter_input_bytes * (1 if checkpointing else shape.layers) if lora and fp32_adapters else 0
    return per_device + kept + recompute + logits + adapters


def forward_bytes(shape: Shape, tokens: int, gpus: int = 1, fp32_adapters: bool = False, use_cache: bool = False) -> float:
    """Peak bytes on one device of a forward pass without gradient over ``tokens`` tokens (a model spread over
    ``gpus`` by layers holds its share of the weights and the temporaries of one layer)."""
    temporaries = tokens * (4 * shape.hidden + 3 * shape.intermediate) * 2
    adapters = tokens * shape.adapter_input_bytes if fp32_adapters else 0
    cache = tokens * shape.kv_bytes / gpus if use_cache else 0
    return shape.params * 2 / gpus + temporaries + adapters + cache + 2**26 * 4  # + a chunk of scored logits


def two_cache_bytes(shape: Shape, cache_tokens: int, prefill_tokens: int) -> float:
    """Spliced or steered generation: the weights, two KV caches of ``cache_tokens`` and the temporaries of a
    prefill chunk of ``prefill_tokens``."""
    return shape.params * 2 + 2 * cache_tokens * shape.kv_bytes + forward_bytes(shape, prefill_tokens) - shape.params * 2


def vllm_bytes(shape: Shape, max_model_len: int, tensor_parallel: int, lora_rank: int = 0) -> float:
    """What one vLLM engine must hold on each of its GPUs to serve one sequence of ``max_model_len``: its share
    of the weights and of one full sequence's KV cache, the LoRA slots, and ~1 GiB of CUDA graphs and buffers."""
    slots = 4 * lora_rank * shape.layers * 7 * (shape.hidden + shape.intermediate) * 2  # max_loras=4 slots
    return (shape.params * 2 + max_model_len * shape.kv_bytes + slots) / tensor_parallel + GiB


# Time, from the reference rates of BENCHMARKS.md (one H200, bf16). A compute-bound pass costs 2 x params
# FLOPs a token per forward-sized pass; the fraction of peak each kind reached at 32B is its efficiency.
PASSES = {"lora": 3, "full": 4, "forward": 1}  # forward, recompute, backward (input grads; + weight grads for full)
MFU = {
    "train": 2_150 * PASSES["lora"] * 2 * QWEN25["32B"].params / (PEAK_TFLOPS * 1e12),  # rank-1 step, Liger, 20k blocks
    "forward": 8_080 * 2 * QWEN25["32B"].params / (PEAK_TFLOPS * 1e12),  # plain forward
}


def gpu_name(gpu_gib: float) -> str:
    return "H200" if gpu_gib > 100 else "H100"


def compute_seconds(shape: Shape, tokens: float, passes: int, kind: str, gpus: int = 1) -> float:
    """Wall seconds of compute-bound work over ``gpus`` GPUs (FSDP or data parallel at ``FSDP_SCALING``)."""
    rate = PEAK_TFLOPS * 1e12 * MFU[kind] * gpus * (FSDP_SCALING if gpus > 1 else 1.0)
    return tokens * passes * 2 * shape.params / rate


def decode_seconds(
    shape: Shape, tokens: float, context: float, requests: float, tp: int, gpu_gib: float, static_slot: int = 0, cache: float = 0
) -> tuple[float, int]:
    """(wall seconds, sequences decoded at once) to generate ``tokens`` tokens over ``requests`` requests of
    mean context ``context``. Decode is bound by reading memory, not by compute: every step reads the
    weights and the batch's KV cache once, at ``HBM_EFFICIENCY`` of the bandwidth. vLLM (continuous
    batching) decodes what the KV cache left by the weights on ``tp`` GPUs holds at the mean context. The
    two-cache generator (``static_slot``: a sequence's most tokens) runs static batches of ``cache //
    static_slot`` sequences, two forwards a token (the reference pass, then the transformed one), each batch
    until its longest response ends (half its slots idle on average: ``STATIC_BATCH_EFFICIENCY``)."""
    weights = shape.params * 2
    forwards = 2 if static_slot else 1
    if static_slot:
        batch = int(max(1, min(requests, cache // static_slot)))
    else:
        room = max(tp * (0.9 * gpu_gib * GiB - GiB) - weights, 0) / shape.kv_bytes
        batch = int(max(1, min(requests, room // max(context, 1))))
    step_bytes = forwards * (weights + batch * context * shape.kv_bytes) / tp
    step = step_bytes / (HBM_TB_S[gpu_name(gpu_gib)] * 1e12 * HBM_EFFICIENCY)
    compute = forwards * batch * 2 * shape.params / (tp * PEAK_TFLOPS * 1e12 * MFU["forward"])
    busy = STATIC_BATCH_EFFICIENCY if static_slot else 1.0
    return tokens / (batch * busy) * max(step, compute), batch


@dataclasses.dataclass
class Stage:
    """One expensive step: its peak bytes a device, what it processes, and the lever that bounds it."""

    name: str
    peak: float
    tokens: float = 0.0
    note: str = ""
    lever: str = ""  # the parameter to change when it does not fit
    fits_at: Callable[[int], float] | None = None  # peak bytes at another value of the lever
    lever_value: int = 0
    seconds: float = 0.0  # wall time on the planned GPUs
    gpus: int = 1  # GPUs the stage holds (for GPU-hours)


def notebook_parameters(notebook: str, given: dict[str, Any]) -> dict[str, Any]:
    """The notebook's parameters as papermill reads them, checked as the notebook itself checks them
    (``params.check_parameters``: its defaults, then ``given``; unknown names, wrong types and values out of
    range refused with a ``ConfigError``)."""
    from paper_lib.params import check_parameters

    return check_parameters(dict(given), notebook)


def generation_work(benchmarks: dict[str, int], runs: int, max_tokens: int) -> tuple[float, float, float]:
    """(requests, generated tokens, mean context) of ``runs`` greedy passes over ``benchmarks`` (name ->
    questions), each response the benchmark's assumed length capped at ``max_tokens``."""
    lengths = {b: min(RESPONSE_TOKENS[b], max_tokens) for b in benchmarks}
    requests = runs * sum(benchmarks.values())
    tokens = runs * sum(n * lengths[b] for b, n in benchmarks.items())
    # the context a generated token reads, averaged over tokens: the prompt and half its response
    context = runs * sum(n * lengths[b] ** 2 / 2 for b, n in benchmarks.items()) / max(tokens, 1) + 300
    return requests, tokens, context


def questions(p: dict[str, Any], names: Sequence[str], limit: int = 0) -> dict[str, int]:
    """Questions per benchmark: the real benchmarks' sizes (the organism's are the same), capped at ``limit``."""
    return {n: min(QUESTIONS[n], limit) if limit else QUESTIONS[n] for n in names}


def judge_stage(model: str, gpus: int, gpu_gib: float, context: int = 8192) -> Stage:
    """A local judge server (vLLM) on its own ``gpus`` GPUs: its share of the weights and of one full
    context's KV cache. Its GPUs are not the notebook's: the README starts it under its own
    ``CUDA_VISIBLE_DEVICES``, or the 32B, spread over every GPU, would meet it there."""
    try:
        shape = shape_of(model)
    except ValueError:
        return Stage("judge server (own GPUs)", 0.0, note=f"{model}: size unknown offline, not planned", gpus=0)
    at = lambda length: vllm_bytes(shape, length, gpus)  # noqa: E731
    note = f"{model.split('/')[-1]}, tensor parallel {gpus} on its own GPUs (CUDA_VISIBLE_DEVICES)"
    return Stage("judge server (own GPUs)", at(context), note=note, lever="--judge-gpus", fits_at=None, gpus=0)


def plan_stages(
    notebook: str, p: dict[str, Any], shape: Shape, gpus: int, gpu_gib: float = 141.0, judge_gpus: int = 4
) -> list[Stage]:
    """The expensive stages of ``notebook`` with parameters ``p`` on ``gpus`` GPUs of ``gpu_gib`` (a local
    judge on ``judge_gpus`` others)."""
    stages = []
    n = notebook[:2]
    if n == "01":
        tokens = p["MAX_LENGTH"] * p["PER_DEVICE_BATCH"]
        fsdp = gpus if p["NUM_PROCESSES"] > 1 else 1
        trained = S1K_TOKENS * p["EPOCHS"]

        def lora_at(length: int, full: bool = False) -> float:
            return training_bytes(
                shape, length * p["PER_DEVICE_BATCH"], not full, p["GRADIENT_CHECKPOINTING"], p["USE_LIGER"], fsdp
            )

        for name, full in (("rank-1 LoRA", False), ("full fine-tune", True))[: 2 if p["TRAIN_FULL"] else 1]:
            at = lambda length, full=full: lora_at(length, full)  # noqa: E731
            seconds = compute_seconds(shape, trained, PASSES["full" if full else "lora"], "train", fsdp)
            host = shape.params * 2 / 1e9  # the weights read on rank 0 alone, and the state dict gathered there at the save
            note = (
                f"FSDP over {fsdp}, {trained / 1e6:.0f}M tokens, host ~{host:.0f} GB on rank 0"
                if fsdp > 1
                else f"one GPU, {trained / 1e6:.0f}M tokens"
            )
            stages.append(
                Stage(f"{name} training", at(p["MAX_LENGTH"]), tokens, note, "MAX_LENGTH", at, p["MAX_LENGTH"], seconds, fsdp)
            )
    if n in ("02", "03", "07"):
        tp = p.get("TENSOR_PARALLEL", 1)
        at = lambda length: vllm_bytes(shape, length, tp, 16)  # noqa: E731
        names = ("aime24", "math500", "gpqa_diamond") if n == "02" else ("aime24", "math500")
        if n == "02":  # base chat, base forced, the adapter, the full model: greedy and N_SAMPLES samples each
            runs = 4 * (1 + p["N_SAMPLES"])
            scaling = [int(b) for b in p["SCALING_BUDGETS"].split(",") if b.strip()] if p["SCALING_BENCHMARK"] else []
            waits = len([w for w in p["SCALING_WAITS"].split(",") if w.strip()]) if p["SCALING_BENCHMARK"] else 0
        else:
            runs, scaling, waits = (4 if n == "03" else 1 + len(p.get("ADAPTER_RUNS", "").split(","))), [], 0
        requests, tokens, context = generation_work(questions(p, names, p.get("N_BENCHMARK_QUESTIONS", 0)), runs, p["MAX_TOKENS"])
        for budget in scaling:  # 3 models x the scaling benchmark's questions, thinking capped at the budget
            requests += 3 * QUESTIONS["aime24"]
            tokens += 3 * QUESTIONS["aime24"] * min(budget + p["ANSWER_TOKENS"], p["MAX_TOKENS"])
        tokens += 3 * waits * QUESTIONS["aime24"] * min(RESPONSE_TOKENS["aime24"], p["MAX_TOKENS"])
        # one request set an engine (evaluation.evaluate_tasks): every run it serves batches together
        seconds, batch = decode_seconds(shape, tokens, context, requests, tp, gpu_gib)
        stages.append(
            Stage(
                "vLLM generation (a GPU of it)",
                at(p["MAX_MODEL_LEN"]),
                tokens,
                f"tensor parallel {tp}, ~{batch} sequences at once, {tokens / 1e6:.1f}M tokens decoded",
                "MAX_MODEL_LEN",
                at,
                p["MAX_MODEL_LEN"],
                seconds,
                tp,
            )
        )
    if n == "03":
        cap = p["BATCH_TOKENS"] or p["BATCH_SIZE"] * p["MAX_LENGTH"]
        at = lambda t: forward_bytes(shape, t, gpus, fp32_adapters=False)  # noqa: E731
        # each layer, each (layer, projection), attention / MLP, all, none; a group's forward starts at its first
        # ablated layer (the reference's residual stream there), so a layer's groups run (layers - l) / layers of one
        passes = 8 * (shape.layers + 1) / 2 + 2 + 1 + 1
        tokens = passes * p["N_TRACES"] * p["MAX_LENGTH"]
        seconds = compute_seconds(shape, tokens, 1, "forward")
        record = (
            shape.layers * min(cap, p["N_TRACES"] * p["MAX_LENGTH"]) * shape.hidden * (4 if p["DTYPE"] == "float32" else 2) / 1e9
        )
        stages.append(
            Stage(
                "ablation KL batch",
                at(cap),
                tokens,
                f"{passes:.0f} forwards' work a trace, use_cache off, layers spread over the GPUs (one at work); "
                f"host ~{record:.1f} GB for the batch's residual stream at every layer",
                "BATCH_TOKENS",
                at,
                cap,
                seconds,
                gpus,
            )
        )
    if n == "04":
        at = lambda b: forward_bytes(shape, b * p["MAX_LENGTH"], gpus)  # noqa: E731
        tokens = (p["N_TRACES"] or 1000) * min(p["MAX_LENGTH"], S1K_TOKENS / 1000)
        seconds = compute_seconds(shape, tokens, 1, "forward", gpus)
        stages.append(
            Stage(
                "extraction batch",
                at(p["BATCH_SIZE"]),
                tokens,
                "adapters in the model's dtype",
                "BATCH_SIZE",
                at,
                p["BATCH_SIZE"],
                seconds,
                gpus,
            )
        )
    if n == "05":
        cap = p["BATCH_TOKENS"]
        at = lambda t: forward_bytes(shape, t, 1)  # noqa: E731
        tokens = 3 * p["N_SPLICE_TRACES"] * p["MAX_LENGTH"]
        seconds = compute_seconds(shape, tokens, 1, "forward")
        stages.append(
            Stage(
                "splice KL batch",
                at(cap),
                tokens,
                "use_cache off, adapters in the serving dtype",
                "BATCH_TOKENS",
                at,
                cap,
                seconds,
            )
        )
    if n == "05":  # the SAE itself: encoder and decoder in float32, their gradients and Adam's two moments
        d_in = shape.layers * 7
        latents = d_in * p["EXPANSION"]
        sae = 2 * d_in * latents * 4 * 4 + p["BATCH_SIZE"] * latents * 4 * 4
        trained = (p.get("N_TRACES", 1000) or 1000) * S1K_TOKENS / 1000 * p["EPOCHS"]
        stages.append(Stage("SAE training", sae, trained, f"{d_in} inputs x {latents} latents, float32", seconds=trained / 2e6))
    if n in ("04", "06") and any(h in p.get("JUDGE_URL", "") for h in ("127.0.0.1", "localhost")):
        stages.append(judge_stage(p["JUDGE_MODEL"], judge_gpus, gpu_gib))
    if n == "06":  # the adapted model held for the latents' logit effects (and the steering below)
        stages.append(Stage("model for logit effects", shape.params * 2 + GiB, note="weights, one unembedding product"))
    if n == "05" or (n == "06" and p["ROLE_SCORER"]):  # notebook 06 steers only the organism (its roles)
        chunk = min(p["CACHE_TOKENS"], p.get("BATCH_TOKENS", 16384))
        at = lambda c: two_cache_bytes(shape, c, min(c, chunk))  # noqa: E731
        if n == "05":  # the base, the adapter and the spliced SAE on AIME and N_MATH MATH questions
            work = generation_work(questions(p, ("aime24",)) | {"math500": p["N_MATH"] or 500}, 3, p["MAX_TOKENS"])
        else:  # each steering strength and its equal-norm random direction on AIME
            strengths = len([x for x in p["STEER_STRENGTHS"].split(",") if x.strip()])
            work = generation_work(questions(p, ("aime24",)), 2 * strengths, p["MAX_TOKENS"])
        requests, tokens, context = work
        slot = p["MAX_TOKENS"] + 300  # a sequence's prompt and its most generated tokens
        seconds, batch = decode_seconds(shape, tokens, context, requests, 1, gpu_gib, slot, p["CACHE_TOKENS"])
        stages.append(
            Stage(
                "two-cache generator",
                at(p["CACHE_TOKENS"]),
                tokens,
                f"prefill in chunks, ~{batch} sequences at once, two forwards a token",
                "CACHE_TOKENS",
                at,
                p["CACHE_TOKENS"],
                seconds,
            )
        )
    return stages


def largest_fitting(stage: Stage, budget: float) -> int | None:
    """The largest value of the stage's lever, its current value halved until the stage fits ``budget``; None
    if none does."""
    value = stage.lever_value
    while value >= 1:
        if stage.fits_at(value) <= budget:
            return value
        value //= 2
    return None


def plan(
    notebook: str, model: str, gpus: int, gpu_gib: float, given: dict[str, Any], judge_gpus: int = 4
) -> tuple[list[Stage], list[str]]:
    """Stages and the refusals (a sentence each, naming the parameter and a value that fits)."""
    from paper_lib.run_notebooks import list_notebooks

    matches = [p.stem for p in list_notebooks() if p.stem.startswith(notebook)]
    if len(matches) != 1:
        raise SystemExit(f"{notebook!r} names {len(matches)} notebooks; give a prefix such as 05 or 05_train_sae")
    p = notebook_parameters(matches[0], given)
    shape = shape_of(model)
    stages = plan_stages(matches[0], p, shape, gpus, gpu_gib, judge_gpus)
    budget = gpu_gib * GiB * 0.95  # CUDA context, allocator fragmentation
    refusals = []
    for stage in stages:
        if stage.peak > budget:
            fits = largest_fitting(stage, budget) if stage.fits_at else None
            refusals.append(
                f"{stage.name}: {stage.peak / GiB:.1f} GiB a GPU > {budget / GiB:.1f} GiB usable of {gpu_gib:g}: "
                + (
                    f"set {stage.lever} to {fits} (it is {stage.lever_value})"
                    if fits
                    else f"raise {stage.lever} or use larger GPUs"
                    if stage.fits_at is None
                    else f"no value of {stage.lever} fits: use more or larger GPUs"
                )
            )
    return stages, refusals


def table(stages: Sequence[Stage], gpu_gib: float) -> str:
    rows = [f"{'stage':<30} {'peak GiB/GPU':>12} {'tokens':>13} {'hours':>7} {'GPU-h':>7}  note"]
    for s in stages:
        mark = "" if s.peak <= gpu_gib * GiB * 0.95 else "  DOES NOT FIT"
        hours = s.seconds / 3600
        rows.append(f"{s.name:<30} {s.peak / GiB:>12.1f} {s.tokens:>13,.0f} {hours:>7.2f} {hours * s.gpus:>7.2f}  {s.note}{mark}")
    total = sum(s.seconds * s.gpus for s in stages) / 3600
    rows.append(f"{'total':<30} {'':>12} {'':>13} {sum(s.seconds for s in stages) / 3600:>7.2f} {total:>7.2f}")
    return "\n".join(rows)


def main(argv: Sequence[str] | None = None) -> int:
    from paper_lib.config import ConfigError
    from paper_lib.run_notebooks import parse_parameters

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("notebook", nargs="?", help="a notebook name or prefix, e.g. 05 or 05_train_sae")
    parser.add_argument("--model", help="a Qwen2.5 hub id or a local model folder")
    parser.add_argument("--readme", action="store_true", help="instead: the cost table of the README's commands")
    parser.add_argument("--write", action="store_true", help="with --readme: put it between the README's markers")
    parser.add_argument("--gpus", type=int, default=1)
    parser.add_argument("--gpu-gib", type=float, default=141.0, help="memory of one GPU (H200: 141, H100: 80)")
    parser.add_argument("--judge-gpus", type=int, default=4, help="GPUs of a local judge server (JUDGE_URL on 127.0.0.1)")
    parser.add_argument("-p", "--parameter", nargs=2, action="append", default=[], metavar=("NAME", "VALUE"))
    args = parser.parse_args(argv)
    if args.readme:
        from paper_lib.paths import REPO_ROOT

        path = REPO_ROOT / "README.md"
        text = path.read_text()
        block = readme_table(text)
        if args.write:
            head, rest = text.split(PLAN_BEGIN, 1)
            path.write_text(head + PLAN_BEGIN + "\n" + block + "\n" + PLAN_END + rest.split(PLAN_END, 1)[1])
        sys.stdout.write(block + "\n")  # a command-line entry point: the table is its output
        return 0
    if not args.notebook or not args.model:
        parser.error("give a NOTEBOOK and --model (or --readme)")
    try:
        stages, refusals = plan(
            args.notebook, args.model, args.gpus, args.gpu_gib, parse_parameters(args.parameter), args.judge_gpus
        )
    except ConfigError as err:
        print(f"REFUSED {err}", file=sys.stderr)
        return 2
    print(f"{args.notebook} on {args.gpus} x {args.gpu_gib:g} GiB, {args.model}")
    print(table(stages, args.gpu_gib))
    for line in refusals:
        print("REFUSED " + line, file=sys.stderr)
    return 1 if refusals else 0


def model_of(parameters: dict[str, Any], smoke: bool = False) -> str:
    """The base model a notebook's run works on: its ``MODEL`` / ``BASE_MODEL``, or its ``ADAPTER_RUN``'s."""
    for name in ("MODEL", "BASE_MODEL"):
        if parameters.get(name):
            return str(parameters[name])
    from paper_lib.paths import artifact_dir, train_run_name
    from paper_lib.training import TrainConfig

    return TrainConfig.load(artifact_dir(train_run_name(parameters["ADAPTER_RUN"], smoke))).model


def check_plan(section: str, parameters: dict[str, Any], smoke: bool = False) -> list[Stage]:
    """On a GPU box, before any expensive work: plan this run on the GPUs present, print the table, and
    refuse (a ``MemoryError`` naming the parameter and a value that fits) what will not fit. Nothing on a
    machine without CUDA (the organism on CPU)."""
    import torch

    if not torch.cuda.is_available():
        return []
    gpus = torch.cuda.device_count()
    gib = torch.cuda.get_device_properties(0).total_memory / GiB
    model = model_of(parameters, smoke)
    stages, refusals = plan(section, model, gpus, gib, {k: v for k, v in parameters.items()})
    print(f"plan for {model} on {gpus} x {gib:.0f} GiB:\n{table(stages, gib)}")
    if refusals:
        raise MemoryError("this run will not fit: " + "; ".join(refusals))
    return stages


# Measured peaks in BENCHMARKS.md that the model must reproduce within 15% (tests/test_plan.py):
# (shape, tokens, LoRA, checkpointing, Liger, float32 adapters) -> GiB on one H200.
CALIBRATION = [
    ("1.5B", 8192, True, True, False, True, 17.6),  # PEFT default: fp32 adapters, checkpointing
    ("1.5B", 8192, True, True, False, False, 17.6),  # bf16 adapters, checkpointing
    ("1.5B", 8192, True, False, False, False, 37.7),  # bf16 adapters, no checkpointing
    ("1.5B", 8192, True, True, True, False, 4.4),  # Liger, checkpointing
    ("1.5B", 8192, True, False, True, False, 18.9),  # Liger, no checkpointing
    ("32B", 20000, True, True, True, False, 79.7),  # the single-H200 32B probe
]


def readme_commands(text: str) -> list[tuple[str, dict[str, Any], int, str]]:
    """(notebook, parameters, GPUs, model) of every `run NN_...` command in a README's text, ``$REAL``
    expanded; the GPUs are what the command names (processes or tensor parallelism), each an H200."""
    import re
    import shlex

    from paper_lib.run_notebooks import parse_parameters

    real = re.search(r'REAL="([^"]+)"', text)
    found = []
    for match in re.finditer(r"`run (\d\d_\w+) ([^`]+)`", text):
        words = shlex.split(
            match.group(2).replace("$REAL", real.group(1) if real else "").replace("<judge>", "judge").replace("...", "x")
        )
        given = parse_parameters([(words[i + 1], words[i + 2]) for i in range(len(words) - 2) if words[i] == "-p"])
        gpus = max(given.get("NUM_PROCESSES", 1), given.get("TENSOR_PARALLEL", 1))
        model = given.pop("MODEL", None) or given.pop("BASE_MODEL", None) or "Qwen/Qwen2.5-32B-Instruct"
        found.append((match.group(1), given, gpus, model))
    return found


def readme_table(text: str, gpu_gib: float = 141.0) -> str:
    """The cost table of the README's real-scale commands (``make plan``): each planned on the H200s it
    names; the README carries this table verbatim between its ``plan`` markers (a test compares them)."""
    rows = [
        "| notebook | model | GPUs | peak GiB a GPU | hours | GPU-hours | largest stage |",
        "|---|---|---|---|---|---|---|",
    ]
    for notebook, given, gpus, model in readme_commands(text):
        stages, refusals = plan(notebook, model, gpus, gpu_gib, given)
        peak = max(stages, key=lambda st: st.peak)
        hours, gpu_hours = sum(st.seconds for st in stages) / 3600, sum(st.seconds * st.gpus for st in stages) / 3600
        fits = "" if not refusals else " (does not fit)"
        name = model.split("/")[-1]
        rows.append(
            f"| {notebook} | {name} | {gpus} x H200 | {peak.peak / GiB:.0f}{fits} | {hours:.1f} | {gpu_hours:.1f} | {peak.name} |"
        )
    return "\n".join(rows)


PLAN_BEGIN, PLAN_END = "<!-- make plan: begin -->", "<!-- make plan: end -->"


def readme_block(text: str) -> str:
    """The table between the README's plan markers."""
    return text.split(PLAN_BEGIN, 1)[1].split(PLAN_END, 1)[0].strip()


if __name__ == "__main__":
    sys.exit(main())
