"""LoRA activations: the scalar a = A·x of every adapter, per token.

For an adapted projection W, PEFT computes W·x + scale · B(A·x). A rank-1 adapter's activation is the
scalar A·x at the module's input, before the rsLoRA scale (B is not involved): q, k, v read the
input-layernorm output, gate and up the post-attention-layernorm output, o the concatenated heads,
down act(gate)·up. We read it off the ``lora_A`` submodule's output with forward hooks.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
from peft.tuners.lora import LoraLayer
from tqdm.auto import tqdm

# The paper's storage order (their [tokens, 64, 7] arrays): MLP first, then attention.
ADAPTER_MODULES: tuple[str, ...] = ("gate_proj", "up_proj", "down_proj", "q_proj", "k_proj", "v_proj", "o_proj")
_LAYER = re.compile(r"\.layers\.(\d+)\.")


class NoLoraError(ValueError):
    """The model carries no LoRA adapters to read."""


def find_adapters(model: torch.nn.Module, adapter: str = "default") -> dict[tuple[int, str], LoraLayer]:
    """Every LoRA layer of ``adapter``, keyed by (layer index, module name)."""
    found = {}
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer) and adapter in module.lora_A:
            match = _LAYER.search(name + ".")
            short = name.rsplit(".", 1)[-1]
            if match and short in ADAPTER_MODULES:
                found[(int(match.group(1)), short)] = module
    if not found:
        raise NoLoraError(f"the model has no LoRA adapter named {adapter!r} on {ADAPTER_MODULES}")
    return found


def _layout(keys: Iterable[tuple[int, str]]) -> tuple[list[int], list[str]]:
    keys = list(keys)
    return sorted({layer for layer, _ in keys}), [m for m in ADAPTER_MODULES if any(k[1] == m for k in keys)]


def adapter_layout(model: torch.nn.Module, adapter: str = "default") -> tuple[list[int], list[str]]:
    """The adapted layer indices and module names (in ``ADAPTER_MODULES`` order) that activations cover."""
    return _layout(find_adapters(model, adapter))


@contextmanager
def capture_lora_activations(model: torch.nn.Module, adapter: str = "default") -> Iterator[dict[tuple[int, str], torch.Tensor]]:
    """Within the context, each forward pass fills the yielded dict with ``(layer, module) -> A·x``
    of shape [batch, seq, r]."""
    store: dict[tuple[int, str], torch.Tensor] = {}
    handles = []
    for key, module in find_adapters(model, adapter).items():
        def hook(_mod, _inp, out, key=key):
            store[key] = out.detach()
        handles.append(module.lora_A[adapter].register_forward_hook(hook))
    try:
        yield store
    finally:
        for handle in handles:
            handle.remove()


@torch.no_grad()
def lora_activations(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                     adapter: str = "default") -> tuple[torch.Tensor, list[int], list[str]]:
    """Rank-1 adapter activations ``[batch, seq, n_layers, n_modules]`` (float32), with the layer indices
    and module names of the last two axes. Modules the adapter lacks are absent, not zero-filled."""
    keys = find_adapters(model, adapter)
    layers, modules = _layout(keys)
    if any(m.r[adapter] != 1 for m in keys.values()):
        raise ValueError("lora_activations reads rank-1 adapters; this adapter has rank > 1")
    missing = [(l, m) for l in layers for m in modules if (l, m) not in keys]
    if missing:  # a (layer, module) pair absent in some layers only: say so, do not fill it in
        raise ValueError(f"adapters are not rectangular over layers x modules; missing {missing[:5]}")
    with capture_lora_activations(model, adapter) as store:
        model(input_ids=input_ids, attention_mask=attention_mask)
    batch, seq = input_ids.shape
    out = torch.empty((batch, seq, len(layers), len(modules)))
    for (layer, module), value in store.items():
        out[:, :, layers.index(layer), modules.index(module)] = value[..., 0].float().cpu()
    return out, layers, modules


# ----------------------------------------------------------------------------------------------------
# Streaming extraction to shards


def _shard_paths(out_dir: Path, shard: int) -> dict[str, Path]:
    stem = out_dir / f"shard_{shard:05d}"
    return {"tokens": stem.with_suffix(".tokens.npy"), "acts": stem.with_suffix(".acts.npy"),
            "offsets": stem.with_suffix(".offsets.npy"), "done": stem.with_suffix(".done")}


def extract_activation_shards(model: torch.nn.Module, tokenizer: Any, texts: Sequence[str], out_dir: str | Path,
                              batch_size: int = 16, docs_per_shard: int = 256, dtype: str = "float16",
                              max_length: int = 2048, adapter: str = "default") -> "ActivationStore":
    """Adapter activations of every token of ``texts``, written shard by shard with bounded memory.

    Each shard holds whole documents: token ids (int32), activations ``[tokens, n_layers, n_modules]``
    in ``dtype`` and document offsets; a ``.done`` marker is written last, so an interrupted run resumes
    at the first unfinished shard and produces the same files as an uninterrupted one.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    layers, modules = adapter_layout(model, adapter)
    meta = {"layers": layers, "modules": modules, "dtype": dtype, "n_docs": len(texts), "docs_per_shard": docs_per_shard,
            "max_length": max_length, "module_order": list(ADAPTER_MODULES)}
    meta_path = out_dir / "meta.json"
    if meta_path.is_file():
        old = json.loads(meta_path.read_text())
        if old != meta:
            raise ValueError(f"{out_dir} holds an extraction with other settings ({old}); use another folder")
    else:
        meta_path.write_text(json.dumps(meta, indent=2) + "\n")
    n_shards = math.ceil(len(texts) / docs_per_shard)
    device = next(model.parameters()).device
    tokenizer.padding_side = "right"
    for shard in tqdm(range(n_shards), desc="extracting activation shards", unit="shard"):
        paths = _shard_paths(out_dir, shard)
        if paths["done"].is_file():
            continue
        docs = texts[shard * docs_per_shard : (shard + 1) * docs_per_shard]
        tokens, acts, offsets = [], [], [0]
        for i in range(0, len(docs), batch_size):
            enc = tokenizer(list(docs[i : i + batch_size]), return_tensors="pt", padding=True, truncation=True,
                            max_length=max_length, add_special_tokens=False)
            values, _, _ = lora_activations(model, enc["input_ids"].to(device), enc["attention_mask"].to(device), adapter)
            for row in range(len(enc["input_ids"])):
                n = int(enc["attention_mask"][row].sum())
                tokens.append(enc["input_ids"][row, :n].numpy().astype(np.int32))
                acts.append(values[row, :n].numpy().astype(dtype))
                offsets.append(offsets[-1] + n)
        np.save(paths["tokens"], np.concatenate(tokens))
        np.save(paths["acts"], np.concatenate(acts))
        np.save(paths["offsets"], np.asarray(offsets, dtype=np.int64))
        paths["done"].write_text("")
    return ActivationStore(out_dir)


class ActivationStore:
    """Read-only view of an extraction: documents by index, or all tokens' activations at once.

    Shards are memory-mapped, so opening a 10M-token store reads nothing until it is indexed.
    """

    def __init__(self, out_dir: str | Path) -> None:
        self.dir = Path(out_dir)
        meta_path = self.dir / "meta.json"
        if not meta_path.is_file():
            raise FileNotFoundError(f"no activation store at {self.dir} (meta.json missing)")
        self.meta = json.loads(meta_path.read_text())
        n_shards = math.ceil(self.meta["n_docs"] / self.meta["docs_per_shard"])
        self.shards = [_shard_paths(self.dir, s) for s in range(n_shards)]
        unfinished = [s for s, p in enumerate(self.shards) if not p["done"].is_file()]
        if unfinished:
            raise ValueError(f"extraction at {self.dir} is unfinished (shards {unfinished[:5]}); rerun it to resume")
        self._offsets = [np.load(p["offsets"]) for p in self.shards]

    @property
    def layers(self) -> list[int]:
        return self.meta["layers"]

    @property
    def modules(self) -> list[str]:
        return self.meta["modules"]

    def __len__(self) -> int:
        return self.meta["n_docs"]

    def document(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """(token ids [n], activations [n, n_layers, n_modules]) of one document."""
        shard, local = divmod(index, self.meta["docs_per_shard"])
        start, end = self._offsets[shard][local], self._offsets[shard][local + 1]
        paths = self.shards[shard]
        return (np.load(paths["tokens"], mmap_mode="r")[start:end],
                np.load(paths["acts"], mmap_mode="r")[start:end])

    def tokens(self) -> np.ndarray:
        return np.concatenate([np.load(p["tokens"], mmap_mode="r") for p in self.shards])

    def activations(self) -> np.ndarray:
        """Every token's activations, ``[tokens, n_layers, n_modules]`` (loads all shards)."""
        return np.concatenate([np.load(p["acts"], mmap_mode="r") for p in self.shards])

    def document_ids(self) -> np.ndarray:
        """For every token, the index of its document."""
        per_shard = self.meta["docs_per_shard"]
        return np.concatenate([np.repeat(np.arange(len(o) - 1) + s * per_shard, np.diff(o))
                               for s, o in enumerate(self._offsets)])


@torch.no_grad()
def mlp_neuron_activations(model: torch.nn.Module, input_ids: torch.Tensor, neurons: Sequence[tuple[int, int]],
                           attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """MLP neuron activations act(gate)·up (the down_proj input) for ``neurons`` = (layer, index) pairs:
    ``[batch, seq, len(neurons)]`` (float32). Works with or without LoRA adapters on the model."""
    wanted: dict[int, list[int]] = {}
    for layer, index in neurons:
        wanted.setdefault(layer, []).append(index)
    down_projs = {int(match.group(1)): module for name, module in model.named_modules()
                  if name.endswith("mlp.down_proj") and (match := _LAYER.search(name + "."))}
    missing = set(wanted) - set(down_projs)
    if missing:
        raise ValueError(f"the model has no MLP at layers {sorted(missing)}")
    store: dict[int, torch.Tensor] = {}
    handles = [down_projs[layer].register_forward_pre_hook(
        lambda _m, args, layer=layer: store.__setitem__(layer, args[0][..., wanted[layer]].detach().float()))
        for layer in wanted]
    try:
        model(input_ids=input_ids, attention_mask=attention_mask)
    finally:
        for handle in handles:
            handle.remove()
    columns = {layer: 0 for layer in wanted}
    out = []
    for layer, _ in neurons:
        out.append(store[layer][..., columns[layer]])
        columns[layer] += 1
    return torch.stack(out, dim=-1).cpu()
