"""Adapter ablations: how much the next-token distribution moves when chosen adapters are removed.

Metric (the paper's figure 1): KL(p_full || p_ablated), summed over the vocabulary, averaged over the
completion tokens of each trace; we report the mean over traces with a bootstrap interval. Ablating an
adapter sets its scale to zero for the forward pass, which removes scale·B·A·x exactly (the same as
zeroing A and B) and is restored afterwards.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from paper_lib.activations import adapter_layout, find_adapters
from paper_lib.formats import ADAPTER_MODULES, ATTENTION_MODULES, MLP_MODULES
from paper_lib.statistics import bootstrap_interval


@contextmanager
def ablated(model: torch.nn.Module, keys: Iterable[tuple[int, str]], adapter: str = "default") -> Iterator[None]:
    """Within the context, the adapters at ``keys`` ((layer, module) pairs) contribute nothing."""
    layers = find_adapters(model, adapter)
    saved = {}
    try:
        for key in keys:
            if key not in layers:
                raise KeyError(f"no adapter at layer {key[0]}, module {key[1]}")
            saved[key] = layers[key].scaling[adapter]
            layers[key].scaling[adapter] = 0.0
        yield
    finally:
        for key, scale in saved.items():
            layers[key].scaling[adapter] = scale


def ablation_groups(model: torch.nn.Module, adapter: str = "default") -> dict[str, dict[str, list[tuple[int, str]]]]:
    """The paper's ablation families: leave one layer out, one (layer, module) at a time, all attention
    vs all MLP adapters, and everything (the adapter's whole effect)."""
    layers, modules = adapter_layout(model, adapter)
    present = set(find_adapters(model, adapter))
    by_layer = {f"layer {l}": [(l, m) for m in modules if (l, m) in present] for l in layers}
    single = {f"{l}/{m}": [(l, m)] for l in layers for m in modules if (l, m) in present}
    kinds = {"attention": [k for k in present if k[1] in ATTENTION_MODULES], "mlp": [k for k in present if k[1] in MLP_MODULES]}
    return {
        "layer": by_layer,
        "single": single,
        "kind": {k: v for k, v in kinds.items() if v},
        "all": {"all adapters": sorted(present)},
    }


def kl_divergence(reference_logits: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """KL(p_ref || p) per position, summed over the vocabulary: [..., vocab] -> [...]."""
    ref = reference_logits.float().log_softmax(-1)
    other = logits.float().log_softmax(-1)
    return (ref.exp() * (ref - other)).sum(-1)


def split_head(model: torch.nn.Module) -> tuple[torch.nn.Module, torch.nn.Module]:
    """(decoder returning final-norm hidden states, unembedding) of a causal LM or a PEFT model of one."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return base.get_decoder(), base.get_output_embeddings()


def chunked_kl(
    head: torch.nn.Module, reference_hidden: torch.Tensor, hidden: torch.Tensor, chunk_elements: int = 2**26
) -> torch.Tensor:
    """KL(p_ref || p) per position from final hidden states [n, d], unembedding a chunk of positions at a
    time: at a 152k vocabulary full-sequence logits are the memory hog (a 4,096-token batch is 2.5 GB of
    fp32 logits per copy), so at most ``chunk_elements`` logits exist per copy."""
    step = max(1, chunk_elements // head.weight.shape[0])
    out = [kl_divergence(head(reference_hidden[i : i + step]), head(hidden[i : i + step])) for i in range(0, len(hidden), step)]
    return torch.cat(out) if out else hidden.new_zeros(0, dtype=torch.float32)


def trace_means(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per row of ``mask`` ([traces, seq]), the mean of ``values`` over its True positions (``values`` holds
    one number per True position, in ``mask[mask]`` order); 0 for a row without any."""
    which = mask.nonzero()[:, 0].to(values.device)  # the trace of each scored position
    counts = mask.sum(1).clamp_min(1).to(values.device, torch.float32)
    return torch.zeros(len(counts), device=values.device).index_add_(0, which, values.float()) / counts


class _Passthrough(torch.nn.Module):
    """Stands in for a decoder layer whose output is already known: hands on the hidden states it gets."""

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return hidden_states


@contextmanager
def starting_at(decoder: torch.nn.Module, layer: int) -> Iterator[None]:
    """Within the context the decoder's layers before ``layer`` pass their input through, so a forward fed
    ``inputs_embeds`` = the residual stream at ``layer``'s input runs only ``layer`` onwards."""
    saved = list(decoder.layers[:layer])
    try:
        for i in range(layer):
            decoder.layers[i] = _Passthrough()
        yield
    finally:
        for i, module in enumerate(saved):
            decoder.layers[i] = module


@contextmanager
def layer_inputs(decoder: torch.nn.Module, store: torch.device) -> Iterator[list[torch.Tensor]]:
    """Within the context each forward of ``decoder`` records the residual stream entering each layer (on
    ``store``); the list is empty if a layer does not return a plain tensor (then nothing can be skipped)."""
    seen: list[torch.Tensor] = []
    plain = [True]

    def before(module: Any, args: tuple, kwargs: dict) -> None:
        seen.append((args[0] if args else kwargs["hidden_states"]).detach().to(store, copy=True))

    def after(module: Any, args: tuple, output: Any) -> None:
        plain[0] = plain[0] and isinstance(output, torch.Tensor)

    handles = [layer.register_forward_pre_hook(before, with_kwargs=True) for layer in decoder.layers]
    handles += [layer.register_forward_hook(after) for layer in decoder.layers]
    try:
        yield seen
    finally:
        for handle in handles:
            handle.remove()
        if not plain[0]:
            seen.clear()


@torch.no_grad()
def ablation_kl(
    model: torch.nn.Module,
    batches: Sequence[dict[str, torch.Tensor]],
    groups: dict[str, list[tuple[int, str]]],
    adapter: str = "default",
    chunk_elements: int = 2**26,
) -> pd.DataFrame:
    """Per (group, trace): mean KL over the trace's scored positions. Each batch holds input_ids,
    attention_mask and ``score_mask`` (positions whose next-token prediction counts: the completion).

    Runs where the model is (its input device; a model spread over GPUs works too); logits exist only
    for scored positions, ``chunk_elements`` at a time. Layers below a group's first ablated layer compute
    what the unablated forward computed, so a group starts from the residual stream the reference forward
    recorded at that layer (bit for bit the same result, about half the work over the single-adapter and
    leave-one-layer-out groups). The record is kept in host memory when the model is on GPUs: layers x
    tokens x hidden size in the model's dtype (32B: 64 x 16,384 x 5,120 x 2 bytes = 10.7 GB a batch)."""
    from paper_lib.training import input_device

    decoder, head = split_head(model)
    device = input_device(model)
    store = torch.device("cpu") if device.type == "cuda" else device
    rows = []
    trace = 0
    with tqdm(total=len(batches) * len(groups), desc="ablations", unit="pass") as bar:
        for batch in batches:
            ids = batch["input_ids"].to(device)
            inputs = {"attention_mask": batch["attention_mask"].to(device)}
            inputs["use_cache"] = False  # a KV cache nobody reads: 32 GiB at 32B for 131k tokens
            mask = batch["score_mask"].bool().to(device)
            with layer_inputs(decoder, store) as residual:
                reference = decoder(input_ids=ids, **inputs).last_hidden_state[mask]
            for name, keys in groups.items():
                first = min(layer for layer, _ in keys) if residual else 0
                with ablated(model, keys, adapter), starting_at(decoder, first):
                    start = {"inputs_embeds": residual[first].to(device)} if first else {"input_ids": ids}
                    hidden = decoder(**start, **inputs).last_hidden_state[mask]
                per_trace = trace_means(chunked_kl(head, reference, hidden, chunk_elements), mask)
                rows += [{"group": name, "trace": trace + i, "kl": float(v)} for i, v in enumerate(per_trace.tolist())]
                bar.update(1)
            del residual[:]
            trace += len(ids)
    return pd.DataFrame(rows)


def summarize_kl(per_trace: pd.DataFrame, n_resamples: int = 2000, seed: int = 0) -> pd.DataFrame:
    """Mean KL per group with a 95% bootstrap interval over traces."""
    rows = []
    for name, group in per_trace.groupby("group", sort=False):
        x = group["kl"].to_numpy()
        lo, hi = bootstrap_interval(x, n_resamples=n_resamples, seed=seed)
        rows.append({"group": name, "kl": float(np.mean(x)), "lo": lo, "hi": hi, "n": len(x)})
    return pd.DataFrame(rows)


def module_layer_table(summary: pd.DataFrame) -> pd.DataFrame:
    """The single-adapter KLs as a module x layer table (rows in ``ADAPTER_MODULES`` order)."""
    single = summary[summary["group"].str.contains("/")].copy()
    single[["layer", "module"]] = single["group"].str.split("/", expand=True)
    single["layer"] = single["layer"].astype(int)
    table = single.pivot(index="module", columns="layer", values="kl")
    return table.reindex([m for m in ADAPTER_MODULES if m in table.index])


def save_adapter_subset(adapter_dir: str | Path, out_dir: str | Path, keep: Sequence[str]) -> Path:
    """A copy of a PEFT adapter in which only the modules in ``keep`` act (the others' B set to zero), so
    attention-only or MLP-only variants can be served beside the full adapter (e.g. by one vLLM engine)."""
    import shutil

    from safetensors.torch import load_file, save_file

    adapter_dir, out_dir = Path(adapter_dir), Path(out_dir)
    weights = adapter_dir / "adapter_model.safetensors"
    if not weights.is_file():
        raise FileNotFoundError(f"no PEFT adapter weights at {weights}")
    unknown = set(keep) - set(ADAPTER_MODULES)
    if unknown:
        raise ValueError(f"unknown modules {sorted(unknown)}")
    out_dir.mkdir(parents=True, exist_ok=True)
    tensors = load_file(str(weights))
    for name, tensor in tensors.items():
        module = next((m for m in ADAPTER_MODULES if f".{m}." in name), None)
        if "lora_B" in name and module not in keep:
            tensors[name] = torch.zeros_like(tensor)
    save_file(tensors, str(out_dir / "adapter_model.safetensors"))
    shutil.copy(adapter_dir / "adapter_config.json", out_dir / "adapter_config.json")
    return out_dir


def trace_statistic(
    per_trace: pd.DataFrame,
    statistic: Callable[[list[str]], Callable[[np.ndarray], float]],
    n_resamples: int = 2000,
    seed: int = 0,
) -> tuple[float, float, float]:
    """A statistic of the groups' mean KLs with a 95% bootstrap interval that resamples traces, every group
    of a trace together (paired): e.g. the late layers' mean KL minus the other thirds', or the single MLP
    adapters' mean over the single attention adapters'. ``statistic(groups)`` returns a function of the
    vector of per-group means (in ``groups`` order), so a resample is one numpy mean, not a table."""
    wide = per_trace.pivot(index="trace", columns="group", values="kl")
    values, of_means = wide.to_numpy(), statistic(list(wide.columns))
    lo, hi = bootstrap_interval(np.arange(len(values)), lambda r: of_means(values[r].mean(0)), n_resamples=n_resamples, seed=seed)
    return float(of_means(values.mean(0))), lo, hi


def later_layers_margin(groups: list[str]) -> Callable[[np.ndarray], float]:
    """The last third of the layers' mean single-layer KL minus the larger of the other two thirds' (the
    paper: later layers matter most, so > 0)."""
    layers = sorted((int(g.split(" ")[1]), i) for i, g in enumerate(groups) if g.startswith("layer "))
    thirds = [[i for _, i in third] for third in np.array_split(np.array(layers), 3)]
    return lambda m: float(m[thirds[2]].mean() - max(m[thirds[0]].mean(), m[thirds[1]].mean()))


def single_adapter_ratio(groups: list[str]) -> Callable[[np.ndarray], float]:
    """Mean KL of removing one MLP adapter over that of removing one attention adapter (single-adapter means:
    how the paper's ~2.4x was computed)."""
    mlp = [i for i, g in enumerate(groups) if "/" in g and g.split("/")[1] in MLP_MODULES]
    attention = [i for i, g in enumerate(groups) if "/" in g and g.split("/")[1] in ATTENTION_MODULES]
    return lambda m: float(m[mlp].mean() / m[attention].mean())


def module_margin(module: str) -> Callable[[list[str]], Callable[[np.ndarray], float]]:
    """``module``'s mean single-adapter KL minus the largest other module's (the paper: the MLP gates matter
    most, so ``module_margin('gate_proj') > 0``)."""

    def of_groups(groups: list[str]) -> Callable[[np.ndarray], float]:
        columns = {m: [i for i, g in enumerate(groups) if "/" in g and g.split("/")[1] == m] for m in ADAPTER_MODULES}
        columns = {m: c for m, c in columns.items() if c}
        others = [c for m, c in columns.items() if m != module]
        return lambda v: float(v[columns[module]].mean() - max(v[c].mean() for c in others))

    return of_groups
