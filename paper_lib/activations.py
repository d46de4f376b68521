"""LoRA activations: the scalar a = A·x of every adapter, per token.

For an adapted projection W, PEFT computes W·x + scale · B(A·x). A rank-1 adapter's activation is the
scalar A·x at the module's input, before the rsLoRA scale (B is not involved): q, k, v read the
input-layernorm output, gate and up the post-attention-layernorm output, o the concatenated heads,
down act(gate)·up. We read it off the ``lora_A`` submodule's output with forward hooks, or, for fast
extraction, from a ``ReadoutLinear`` that computes it beside the projection (``build_readout_model``).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import re
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
from peft.tuners.lora import LoraLayer
from tqdm.auto import tqdm

from paper_lib.config import describe_differences, differences, fingerprint

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
            match = _LAYER.search("." + name + ".")
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


def _check_rectangular(keys: Iterable[tuple[int, str]]) -> tuple[list[int], list[str]]:
    keys = set(keys)
    layers, modules = _layout(keys)
    missing = [(l, m) for l in layers for m in modules if (l, m) not in keys]
    if missing:  # a (layer, module) pair absent in some layers only: say so, do not fill it in
        raise ValueError(f"adapters are not rectangular over layers x modules; missing {missing[:5]}")
    return layers, modules


@torch.no_grad()
def lora_activations(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                     adapter: str = "default") -> tuple[torch.Tensor, list[int], list[str]]:
    """Rank-1 adapter activations ``[batch, seq, n_layers, n_modules]`` (float32), with the layer indices
    and module names of the last two axes. Modules the adapter lacks are absent, not zero-filled.

    ``model`` is a PEFT model (read with hooks on ``lora_A``) or a model made by ``build_readout_model``
    (read from what each ``ReadoutLinear`` recorded)."""
    readouts = find_readouts(model)
    if readouts:
        keys, store = readouts, readouts[next(iter(readouts))].store
        store.clear()
        model(input_ids=input_ids, attention_mask=attention_mask, logits_to_keep=1)  # no adapter on lm_head
    else:
        keys = find_adapters(model, adapter)
        if any(m.r[adapter] != 1 for m in keys.values()):
            raise ValueError("lora_activations reads rank-1 adapters; this adapter has rank > 1")
        with capture_lora_activations(model, adapter) as store:
            model(input_ids=input_ids, attention_mask=attention_mask, logits_to_keep=1)
    layers, modules = _check_rectangular(keys)
    return stack_scalars(store, layers, modules, *input_ids.shape), layers, modules


def stack_scalars(store: dict[tuple[int, str], torch.Tensor], layers: Sequence[int], modules: Sequence[str],
                  batch: int, seq: int) -> torch.Tensor:
    """Captured ``(layer, module) -> A·x`` values as one ``[batch, seq, n_layers, n_modules]`` float32 CPU
    tensor in the given layout."""
    out = torch.empty((batch, seq, len(layers), len(modules)))
    for (layer, module), value in store.items():
        out[:, :, layers.index(layer), modules.index(module)] = value.reshape(batch, seq).float().cpu()
    return out


# ----------------------------------------------------------------------------------------------------
# Fast extraction: a = A·x computed beside each adapted projection, no PEFT kernels


class ReadoutLinear(torch.nn.Module):
    """An adapted projection that computes its output and records the adapter scalar ``a = A·x``,
    without PEFT's per-adapter kernels.

    PEFT's unmerged forward runs dropout, lora_A and lora_B as separate kernels with fp32 adapters by
    default: about half the plain forward's speed on a GPU (BENCHMARKS.md, reference rows). Here
    ``merged=True`` folds ``scale·B·A`` into ``W`` once (in float32, then cast to the model dtype), so the
    forward is the plain model's plus one [d_in -> 1] product per projection: exact in float32; in bf16 it
    carries the merge rounding that notebook 01 measures. ``merged=False`` keeps ``W`` and adds
    ``scale·a·B`` in place: the unmerged model's arithmetic, at the cost of one pass over the output.
    (Appending A to W as an extra output row was measured slower: the sliced outputs are non-contiguous.)
    PEFT has no such mode, hence this module.
    """

    def __init__(self, layer: LoraLayer, adapter: str, key: tuple[int, str], store: dict, merged: bool) -> None:
        super().__init__()
        base = layer.get_base_layer()
        weight, a_row = base.weight.detach(), layer.lora_A[adapter].weight.detach()
        b_col, scale = layer.lora_B[adapter].weight.detach(), layer.scaling[adapter]
        if a_row.shape[0] != 1:
            raise ValueError("ReadoutLinear reads rank-1 adapters; this adapter has rank > 1")
        if merged:
            weight = (weight.float() + scale * (b_col.float() @ a_row.float())).to(weight.dtype)
        self.weight = torch.nn.Parameter(weight, requires_grad=False)
        self.bias = None if base.bias is None else torch.nn.Parameter(base.bias.detach(), requires_grad=False)
        self.a_row = torch.nn.Parameter(a_row.to(weight.dtype), requires_grad=False)  # [1, d_in]
        self.update = None if merged else torch.nn.Parameter((scale * b_col[:, 0]).to(weight.dtype), requires_grad=False)
        self.key, self.store = key, store

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.nn.functional.linear(x, self.weight, self.bias)
        a = torch.nn.functional.linear(x, self.a_row)  # [..., 1]
        self.store[self.key] = a
        return y if self.update is None else y.addcmul_(a, self.update)


def find_readouts(model: torch.nn.Module) -> dict[tuple[int, str], ReadoutLinear]:
    """The ``ReadoutLinear`` projections of a model made by ``build_readout_model`` (empty otherwise)."""
    return {m.key: m for m in model.modules() if isinstance(m, ReadoutLinear)}


@torch.no_grad()
def build_readout_model(model: torch.nn.Module, merged: bool = False, adapter: str = "default") -> torch.nn.Module:
    """The base transformers model with each rank-1 adapted projection replaced by a ``ReadoutLinear``.

    Consumes ``model`` (a PEFT model; its layers are replaced in place, so a 32B model is never copied).
    ``lora_activations`` and ``extract_activation_shards`` accept the result like a PEFT model."""
    adapters = find_adapters(model, adapter)
    _check_rectangular(adapters)
    store: dict[tuple[int, str], torch.Tensor] = {}
    names = {module: name for name, module in model.named_modules()}
    for key, layer in adapters.items():
        parent_name, _, child = names[layer].rpartition(".")
        model.get_submodule(parent_name).__setattr__(child, ReadoutLinear(layer, adapter, key, store, merged))
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return base.eval()


# ----------------------------------------------------------------------------------------------------
# Streaming extraction to shards


def _shard_paths(out_dir: Path, shard: int) -> dict[str, Path]:
    stem = out_dir / f"shard_{shard:05d}"
    return {"tokens": stem.with_suffix(".tokens.npy"), "acts": stem.with_suffix(".acts.npy"),
            "offsets": stem.with_suffix(".offsets.npy"), "done": stem.with_suffix(".done")}


def file_checksum(path: Path) -> str:
    import hashlib

    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(2**24), b""):
            digest.update(block)
    return digest.hexdigest()


SHARD_FILES = ("tokens", "acts", "offsets")


def finish_shard(paths: dict[str, Path]) -> None:
    """Mark a shard done, last: its ``.done`` records each file's size and checksum."""
    record = {name: {"bytes": paths[name].stat().st_size, "sha256": file_checksum(paths[name])} for name in SHARD_FILES}
    paths["done"].write_text(json.dumps(record) + "\n")


def check_shard(paths: dict[str, Path], n_docs: int, shape: tuple[int, int], verify: bool = True) -> np.ndarray:
    """A finished shard's offsets, after checking that the files are whole and agree: sizes (and, with
    ``verify``, checksums) as recorded when the shard was finished, offsets for ``n_docs`` documents that
    end where the token and activation rows end, activations of ``shape`` per token."""
    record = json.loads(paths["done"].read_text() or "{}")  # stores written before checksums: counts only
    for name, expected in record.items():
        size = paths[name].stat().st_size if paths[name].is_file() else None
        if size != expected["bytes"]:
            raise ValueError(f"shard file {paths[name]} has {size} bytes, {expected['bytes']} when written: it is "
                             "truncated or was replaced; delete the shard (and its .done) and rerun the extraction")
        if verify and file_checksum(paths[name]) != expected["sha256"]:
            raise ValueError(f"shard file {paths[name]} changed since it was written (checksum differs): it is "
                             "corrupt; delete the shard (and its .done) and rerun the extraction")
    try:
        offsets = np.load(paths["offsets"])
        tokens = np.load(paths["tokens"], mmap_mode="r")
        acts = np.load(paths["acts"], mmap_mode="r")
    except (ValueError, OSError, EOFError) as err:
        raise ValueError(f"shard {paths['done'].with_suffix('')} cannot be read ({err}); delete it and rerun the "
                         "extraction") from err
    if len(offsets) != n_docs + 1 or offsets[0] != 0 or offsets[-1] != len(tokens) or len(acts) != len(tokens) \
            or tuple(acts.shape[1:]) != tuple(shape):
        raise ValueError(f"shard {paths['done'].with_suffix('')} is inconsistent: {len(offsets) - 1} documents (want "
                         f"{n_docs}), offsets end at {offsets[-1]}, {len(tokens)} token rows, activations "
                         f"{tuple(acts.shape)} (want [tokens, {shape[0]}, {shape[1]}])")
    return offsets


def _encode(tokenizer: Any, texts: Sequence[str], max_length: int) -> dict[str, torch.Tensor]:
    """The one tokenization of every extraction (right padding, truncation, no added special tokens), so
    that adapter scalars and other projections align token for token."""
    tokenizer.padding_side = "right"
    return tokenizer(list(texts), return_tensors="pt", padding=True, truncation=True, max_length=max_length,
                     add_special_tokens=False)


def extract_activation_shards(model: torch.nn.Module, tokenizer: Any, texts: Sequence[str], out_dir: str | Path,
                              batch_size: int = 16, docs_per_shard: int = 256, dtype: str = "float16",
                              max_length: int = 2048, adapter: str = "default", process_index: int = 0,
                              num_processes: int = 1, provenance: dict[str, Any] | None = None) -> "ActivationStore | None":
    """Adapter activations of every token of ``texts``, written shard by shard with bounded memory.

    Each shard holds whole documents: token ids (int32), activations ``[tokens, n_layers, n_modules]``
    in ``dtype`` and document offsets; a ``.done`` marker is written last, so an interrupted run resumes
    at the first unfinished shard and produces the same files as an uninterrupted one. With several
    processes (one per GPU, e.g. under ``accelerate launch``), process ``i`` writes shards ``i, i + n, ...``
    into the same folder; the store is returned once every shard is done (None while others still run).

    ``meta.json`` records the layout, a fingerprint of ``texts`` and ``provenance`` (what produced the
    scalars: model, adapter and its weights' hash); a folder holding an extraction of other inputs is
    refused, naming what differs, so it is never returned for new ones.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    layers, modules = _layout(find_readouts(model) or find_adapters(model, adapter))
    meta = {"layers": layers, "modules": modules, "dtype": dtype, "n_docs": len(texts), "docs_per_shard": docs_per_shard,
            "max_length": max_length, "module_order": list(ADAPTER_MODULES), "texts": fingerprint(list(texts)),
            **({"provenance": provenance} if provenance else {})}
    meta = json.loads(json.dumps(meta))  # as it reads back
    meta_path = out_dir / "meta.json"
    if meta_path.is_file():
        diff = differences(json.loads(meta_path.read_text()), meta)
        if diff:
            raise ValueError(f"{out_dir} holds an extraction of other inputs ({describe_differences(diff)}); use "
                             "another folder, or delete it (OVERWRITE True in notebook 04)")
    else:  # atomic: several processes may write the same file at once
        tmp = out_dir / f".meta.{process_index}.tmp"
        tmp.write_text(json.dumps(meta, indent=2) + "\n")
        os.replace(tmp, meta_path)
    n_shards = math.ceil(len(texts) / docs_per_shard)
    device = next(model.parameters()).device
    todo = [s for s in range(process_index, n_shards, num_processes) if not _shard_paths(out_dir, s)["done"].is_file()]
    # progress in traces (not shards), so the time-left estimate moves with every batch
    progress = tqdm(total=sum(len(texts[s * docs_per_shard : (s + 1) * docs_per_shard]) for s in todo), unit="trace",
                    desc=f"extracting adapter activations (process {process_index})")
    for shard in todo:
        paths = _shard_paths(out_dir, shard)
        docs = texts[shard * docs_per_shard : (shard + 1) * docs_per_shard]
        tokens, acts, offsets = [], [], [0]
        for i in range(0, len(docs), batch_size):
            enc = _encode(tokenizer, docs[i : i + batch_size], max_length)
            values, _, _ = lora_activations(model, enc["input_ids"].to(device), enc["attention_mask"].to(device), adapter)
            for row in range(len(enc["input_ids"])):
                n = int(enc["attention_mask"][row].sum())
                tokens.append(enc["input_ids"][row, :n].numpy().astype(np.int32))
                acts.append(values[row, :n].numpy().astype(dtype))
                offsets.append(offsets[-1] + n)
            progress.update(len(enc["input_ids"]))
        np.save(paths["tokens"], np.concatenate(tokens))
        np.save(paths["acts"], np.concatenate(acts))
        np.save(paths["offsets"], np.asarray(offsets, dtype=np.int64))
        finish_shard(paths)
    progress.close()
    if all(_shard_paths(out_dir, shard)["done"].is_file() for shard in range(n_shards)):
        return ActivationStore(out_dir)
    return None


def write_activation_store(out_dir: str | Path, documents: Sequence[tuple[np.ndarray, np.ndarray]], layers: Sequence[int],
                           modules: Sequence[str], dtype: str = "float16", docs_per_shard: int = 256) -> "ActivationStore":
    """A store from in-memory documents ``(token ids [n], activations [n, n_layers, n_modules])``: for
    activations computed elsewhere (e.g. the paper's own float16 ``[tokens, 64, 7]`` arrays, whose module
    order is ``ADAPTER_MODULES``) and for synthetic data in tests."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    unknown = set(modules) - set(ADAPTER_MODULES)
    if unknown:
        raise ValueError(f"unknown modules {sorted(unknown)}")
    for i, (ids, acts) in enumerate(documents):
        if acts.shape != (len(ids), len(layers), len(modules)):
            raise ValueError(f"document {i}: activations {acts.shape} do not match {len(ids)} tokens x "
                             f"{len(layers)} layers x {len(modules)} modules")
    meta = {"layers": list(layers), "modules": list(modules), "dtype": dtype, "n_docs": len(documents),
            "docs_per_shard": docs_per_shard, "max_length": None, "module_order": list(ADAPTER_MODULES)}
    (out_dir / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    for shard in range(math.ceil(len(documents) / docs_per_shard)):
        docs = documents[shard * docs_per_shard : (shard + 1) * docs_per_shard]
        paths = _shard_paths(out_dir, shard)
        np.save(paths["tokens"], np.concatenate([np.asarray(ids, dtype=np.int32) for ids, _ in docs]))
        np.save(paths["acts"], np.concatenate([np.asarray(acts).astype(dtype) for _, acts in docs]))
        np.save(paths["offsets"], np.concatenate([[0], np.cumsum([len(ids) for ids, _ in docs])]).astype(np.int64))
        finish_shard(paths)
    return ActivationStore(out_dir)


class ActivationStore:
    """Read-only view of an extraction: documents by index, or all tokens' activations at once.

    Shards are memory-mapped, so opening a 10M-token store reads nothing until it is indexed.
    """

    def __init__(self, out_dir: str | Path, verify: bool = True) -> None:
        """Opens and checks every shard (``check_shard``; ``verify``: checksums too, a read of every file)."""
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
        per_shard = self.meta["docs_per_shard"]
        shape = (len(self.meta["layers"]), len(self.meta["modules"]))
        self._offsets = [check_shard(p, min(per_shard, self.meta["n_docs"] - s * per_shard), shape, verify)
                         for s, p in enumerate(self.shards)]

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

    def shard_document_ids(self, shard: int) -> np.ndarray:
        """For every token of one shard, the index of its document."""
        offsets = self._offsets[shard]
        return np.repeat(np.arange(len(offsets) - 1) + shard * self.meta["docs_per_shard"], np.diff(offsets))

    def document_ids(self) -> np.ndarray:
        """For every token, the index of its document."""
        return np.concatenate([self.shard_document_ids(s) for s in range(len(self.shards))])


def _projection_inputs(model: torch.nn.Module, keys: Iterable[tuple[int, str]]) -> dict[tuple[int, str], torch.nn.Module]:
    """The projection module at each (layer, module) key: a PEFT LoRA layer, a ``ReadoutLinear`` or a plain
    Linear (the outermost module of that name, whose input is the projection's input)."""
    found: dict[tuple[int, str], torch.nn.Module] = {}
    for name, module in model.named_modules():
        short = name.rsplit(".", 1)[-1]
        match = _LAYER.search("." + name + ".")
        if match and short in ADAPTER_MODULES:
            found.setdefault((int(match.group(1)), short), module)
    missing = sorted(set(keys) - set(found))
    if missing:
        raise ValueError(f"the model has no projection at {missing[:5]} (layer, module)")
    return {key: found[key] for key in keys}


@torch.no_grad()
def projected_activations(model: torch.nn.Module, input_ids: torch.Tensor,
                          directions: dict[tuple[int, str], torch.Tensor],
                          attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """``x · d`` for each row ``d`` of ``directions[(layer, module)]`` ([n, d_in]), where ``x`` is that
    projection's input: ``[batch, seq, total n]`` (float32), columns in the dict's order. With A rows as
    directions this is the adapter activation; with random rows, the random-direction control. An integer
    tensor of indices reads those coordinates of ``x`` directly (MLP neurons: the down_proj input), which
    equals one-hot rows without building them (an identity of the MLP width is 2.8 GB at 32B)."""
    modules = _projection_inputs(model, directions)
    store: dict[tuple[int, str], torch.Tensor] = {}

    def hook(key: tuple[int, str]) -> Any:
        def read(_module: torch.nn.Module, args: tuple) -> None:
            x, d = args[0], directions[key]
            if d.dtype in (torch.int32, torch.int64):
                store[key] = x[..., d.to(x.device)].float().cpu()
            else:
                store[key] = (x.float() @ d.to(x.device, torch.float32).T).cpu()
        return read

    handles = [modules[key].register_forward_pre_hook(hook(key)) for key in directions]
    try:
        model(input_ids=input_ids, attention_mask=attention_mask, logits_to_keep=1)
    finally:
        for handle in handles:
            handle.remove()
    return torch.cat([store[key] for key in directions], dim=-1)


def mlp_neuron_activations(model: torch.nn.Module, input_ids: torch.Tensor, neurons: Sequence[tuple[int, int]],
                           attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """MLP neuron activations act(gate)·up (the down_proj input) for ``neurons`` = (layer, index) pairs:
    ``[batch, seq, len(neurons)]`` (float32). Works with or without LoRA adapters on the model."""
    directions = mlp_neuron_directions(model, neurons)
    values = projected_activations(model, input_ids, directions, attention_mask)
    return values[..., _neuron_order(neurons)]


def mlp_neuron_directions(model: torch.nn.Module, neurons: Sequence[tuple[int, int]]) -> dict[tuple[int, str], torch.Tensor]:
    """The down_proj input coordinates of ``neurons`` as index tensors for ``projected_activations``
    (grouped by layer, layers ascending)."""
    layers = sorted({layer for layer, _ in neurons})
    try:
        modules = _projection_inputs(model, [(layer, "down_proj") for layer in layers])
    except ValueError:
        raise ValueError(f"the model has no MLP at some of layers {layers}") from None
    out = {}
    for layer in layers:
        index = torch.tensor([i for l, i in neurons if l == layer], dtype=torch.long)
        width = modules[(layer, "down_proj")].weight.shape[1]
        if len(index) and (index.min() < 0 or index.max() >= width):
            raise ValueError(f"neuron index out of range for layer {layer}'s MLP of width {width}")
        out[(layer, "down_proj")] = index
    return out


def _neuron_order(neurons: Sequence[tuple[int, int]]) -> list[int]:
    """Column of each neuron in ``mlp_neuron_directions``'s layer-grouped output."""
    grouped = sorted(range(len(neurons)), key=lambda j: (neurons[j][0], j))
    position = {j: col for col, j in enumerate(grouped)}
    return [position[j] for j in range(len(neurons))]


def sample_mlp_neurons(model: torch.nn.Module, n: int, seed: int = 0) -> list[tuple[int, int]]:
    """``n`` distinct MLP neurons (layer, index), drawn uniformly over all layers' down_proj inputs."""
    layers = sorted({int(m.group(1)) for name, _ in model.named_modules()
                     if name.endswith("mlp.down_proj") and (m := _LAYER.search("." + name + "."))})
    if not layers:
        raise ValueError("the model has no MLP down_proj layers")
    widths = {l: _projection_inputs(model, [(l, "down_proj")])[(l, "down_proj")].weight.shape[1] for l in layers}
    total = sum(widths.values())
    if n > total:
        raise ValueError(f"asked for {n} neurons; the model has {total}")
    flat = np.random.default_rng(seed).choice(total, size=n, replace=False)
    starts = np.cumsum([0] + [widths[l] for l in layers])
    return [(layers[int(np.searchsorted(starts, f, side="right")) - 1],
             int(f - starts[int(np.searchsorted(starts, f, side="right")) - 1])) for f in flat]


def random_directions(model: torch.nn.Module, keys: Sequence[tuple[int, str]], seed: int = 0) -> dict[tuple[int, str], torch.Tensor]:
    """One Gaussian direction (unit norm) in the input space of each projection at ``keys``: the control
    population, read exactly like the adapters' A rows."""
    modules = _projection_inputs(model, keys)
    generator = torch.Generator().manual_seed(seed)
    out = {}
    for key in keys:
        d = torch.randn(1, modules[key].weight.shape[1], generator=generator)
        out[key] = d / d.norm()
    return out


def extract_projections(model: torch.nn.Module, tokenizer: Any, texts: Sequence[str],
                        directions: dict[tuple[int, str], torch.Tensor], batch_size: int = 16,
                        max_length: int = 2048, dtype: str = "float32") -> np.ndarray:
    """``projected_activations`` for every token of ``texts``, tokenized and truncated exactly as
    ``extract_activation_shards`` does, so rows align with an ``ActivationStore``'s tokens: ``[tokens, n]``
    in ``dtype`` (pass the store's dtype so that every population is compared at the same precision)."""
    device = next(model.parameters()).device
    out = []
    for i in tqdm(range(0, len(texts), batch_size), desc="projections", unit="batch"):
        enc = _encode(tokenizer, texts[i : i + batch_size], max_length)
        values = projected_activations(model, enc["input_ids"].to(device), directions, enc["attention_mask"].to(device))
        out += [values[row, : int(n)].numpy().astype(dtype) for row, n in enumerate(enc["attention_mask"].sum(1))]
    return np.concatenate(out)


def main(argv: list[str] | None = None) -> None:
    """``accelerate launch -m paper_lib.activations --adapter-run RUN --traces DATASET --out DIR``: every
    process extracts its share of the shards on its own GPU (or run it plainly for one device)."""
    from accelerate import PartialState

    from paper_lib.data import format_s1_text, load_traces
    from paper_lib.paths import artifact_dir
    from paper_lib.training import adapter_provenance, load_trained

    parser = argparse.ArgumentParser(description="extract rank-1 adapter activations to shards")
    parser.add_argument("--adapter-run", required=True, help="notebook 01's run folder (under data/)")
    parser.add_argument("--traces", required=True, help="s1K-schema dataset: hub id, folder or file")
    parser.add_argument("--out", required=True, help="output folder (under data/)")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--max-length", type=int, default=20000)
    parser.add_argument("--merged", action="store_true", help="fold B·A into W (fastest; exact in float32 only)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    state = PartialState()
    # straight to this process's device: no full host copy of the model per process
    model, tokenizer, _ = load_trained(args.adapter_run, dtype=getattr(torch, args.dtype), device=str(state.device))
    model = build_readout_model(model, merged=args.merged)
    texts = [format_s1_text(tokenizer, row) for row in load_traces(args.traces)]
    extract_activation_shards(model, tokenizer, texts, artifact_dir(args.out), batch_size=args.batch_size,
                              max_length=args.max_length, process_index=state.process_index,
                              num_processes=state.num_processes, provenance=adapter_provenance(args.adapter_run))


if __name__ == "__main__":
    main()
