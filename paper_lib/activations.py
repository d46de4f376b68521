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
import re
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from peft.tuners.lora import LoraLayer
from tqdm.auto import tqdm

from paper_lib.config import describe_differences, differences, fingerprint
from paper_lib.formats import ADAPTER_MODULES
from paper_lib.paths import explained_disk_errors, write_text_atomically

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


def adapter_keys(model: torch.nn.Module, adapter: str = "default") -> list[tuple[int, str]]:
    """Every adapter's (layer, module), in a store's column order (layer-major, ``ADAPTER_MODULES`` order);
    for a PEFT model or one made by ``build_readout_model``."""
    keys = set(find_readouts(model) or find_adapters(model, adapter))
    layers, modules = _layout(keys)
    return [(layer, module) for layer in layers for module in modules if (layer, module) in keys]


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
def lora_activations(
    model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, adapter: str = "default"
) -> tuple[torch.Tensor, list[int], list[str]]:
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


def stack_scalars(
    store: dict[tuple[int, str], torch.Tensor], layers: Sequence[int], modules: Sequence[str], batch: int, seq: int
) -> torch.Tensor:
    """Captured ``(layer, module) -> A·x`` values as one ``[batch, seq, n_layers, n_modules]`` float32 CPU
    tensor in the given layout."""
    out = torch.empty((batch, seq, len(layers), len(modules)))
    for (layer, module), value in store.items():
        out[:, :, layers.index(layer), modules.index(module)] = value.reshape(batch, seq).float().cpu()
    return out


# ----------------------------------------------------------------------------------------------------
# Replacing the adapter scalars inside the forward pass (the SAE splice, steering)


@contextmanager
def replaced_lora_activations(
    model: torch.nn.Module, values: torch.Tensor, layers: Sequence[int], modules: Sequence[str], adapter: str = "default"
) -> Iterator[None]:
    """Within the context, every adapter's scalar is ``values[..., layer, module]`` (``[batch, seq,
    n_layers, n_modules]``, matching the forward's input) instead of ``A·x``: the update becomes
    scale · value · B."""
    handles = []
    for (layer, module), lora in find_adapters(model, adapter).items():
        column = values[..., layers.index(layer), modules.index(module)]

        def hook(_mod, _inp, out, column=column):
            return column.to(out.device, out.dtype).reshape(out.shape)

        handles.append(lora.lora_A[adapter].register_forward_hook(hook))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def transformed_forward(
    model: torch.nn.Module,
    transform: Callable[[torch.Tensor], torch.Tensor],
    adapter: str = "default",
    caches: tuple[Any, Any] | None = None,
    **inputs: Any,
) -> Any:
    """Two passes: read the scalars, then run with ``transform(scalars)`` in their place (with a KV cache
    per pass when generating). Scalars are ``[batch, seq, n_layers, n_modules]`` in the store's layout."""
    layers, modules = adapter_layout(model, adapter)
    with capture_lora_activations(model, adapter) as store:
        model(**inputs, **({"past_key_values": caches[0]} if caches else {}))
    scalars = stack_scalars(store, layers, modules, *inputs["input_ids"].shape)
    with replaced_lora_activations(model, transform(scalars), layers, modules, adapter):
        return model(**inputs, **({"past_key_values": caches[1]} if caches else {}))


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


LORA = "LoRA"  # the store's own population: the adapter scalars (the ``acts`` files)


def population_slug(name: str) -> str:
    """The file-name part of a population's shard files (``random direction`` -> ``random_direction``)."""
    return re.sub(r"\W+", "_", name.strip().lower())


def _shard_paths(out_dir: Path, shard: int, populations: Iterable[str] = ()) -> dict[str, Path]:
    stem = out_dir / f"shard_{shard:05d}"
    return {
        "tokens": stem.with_suffix(".tokens.npy"),
        "acts": stem.with_suffix(".acts.npy"),
        "offsets": stem.with_suffix(".offsets.npy"),
        **{name: stem.with_suffix(f".{population_slug(name)}.npy") for name in populations},
        "done": stem.with_suffix(".done"),
    }


def file_checksum(path: Path) -> str:
    import hashlib

    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(2**24), b""):
            digest.update(block)
    return digest.hexdigest()


def finish_shard(paths: dict[str, Path]) -> None:
    """Mark a shard done, last: its ``.done`` records each file's size and checksum."""
    record = {
        name: {"bytes": path.stat().st_size, "sha256": file_checksum(path)} for name, path in paths.items() if name != "done"
    }
    paths["done"].write_text(json.dumps(record) + "\n")


def check_shard(
    paths: dict[str, Path], n_docs: int, shape: tuple[int, int], verify: bool = True, widths: dict[str, int] | None = None
) -> np.ndarray:
    """A finished shard's offsets, after checking that the files are whole and agree: sizes (and, with
    ``verify``, checksums) as recorded when the shard was finished, offsets for ``n_docs`` documents that
    end where the token and activation rows end, activations of ``shape`` per token, and ``widths[name]``
    values per token in each other population's file."""
    record = json.loads(paths["done"].read_text() or "{}")  # stores written before checksums: counts only
    for name, expected in record.items():
        size = paths[name].stat().st_size if paths[name].is_file() else None
        if size != expected["bytes"]:
            raise ValueError(
                f"shard file {paths[name]} has {size} bytes, {expected['bytes']} when written: it is "
                "truncated or was replaced; delete the shard (and its .done) and rerun the extraction"
            )
        if verify and file_checksum(paths[name]) != expected["sha256"]:
            raise ValueError(
                f"shard file {paths[name]} changed since it was written (checksum differs): it is "
                "corrupt; delete the shard (and its .done) and rerun the extraction"
            )
    try:
        offsets = np.load(paths["offsets"])
        tokens = np.load(paths["tokens"], mmap_mode="r")
        acts = np.load(paths["acts"], mmap_mode="r")
    except (ValueError, OSError, EOFError) as err:
        raise ValueError(
            f"shard {paths['done'].with_suffix('')} cannot be read ({err}); delete it and rerun the extraction"
        ) from err
    if (
        len(offsets) != n_docs + 1
        or offsets[0] != 0
        or offsets[-1] != len(tokens)
        or len(acts) != len(tokens)
        or tuple(acts.shape[1:]) != tuple(shape)
    ):
        raise ValueError(
            f"shard {paths['done'].with_suffix('')} is inconsistent: {len(offsets) - 1} documents (want "
            f"{n_docs}), offsets end at {offsets[-1]}, {len(tokens)} token rows, activations "
            f"{tuple(acts.shape)} (want [tokens, {shape[0]}, {shape[1]}])"
        )
    for name, width in (widths or {}).items():
        if name not in record and record:
            raise ValueError(
                f"shard {paths['done'].with_suffix('')} was finished without its {name!r} values; delete "
                "it and rerun the extraction"
            )
        try:
            values = np.load(paths[name], mmap_mode="r")
        except (ValueError, OSError, EOFError) as err:
            raise ValueError(f"shard file {paths[name]} cannot be read ({err}); delete the shard and rerun") from err
        if values.shape != (len(tokens), width):
            raise ValueError(f"shard file {paths[name]} holds {tuple(values.shape)} values, want [{len(tokens)}, {width}]")
    return offsets


def _encode(tokenizer: Any, texts: Sequence[str], max_length: int) -> dict[str, torch.Tensor]:
    """The one tokenization of every extraction (right padding, truncation, no added special tokens), so
    that adapter scalars and other projections align token for token."""
    tokenizer.padding_side = "right"
    return tokenizer(
        list(texts), return_tensors="pt", padding=True, truncation=True, max_length=max_length, add_special_tokens=False
    )


class Population(NamedTuple):
    """A population of scalar features read in the extraction's own forward pass, beside the adapter
    scalars: per projection ``(layer, module)``, rows ``[n, d_in]`` of directions in that projection's
    input space (float) or coordinates of that input (an integer index tensor: MLP neurons are the
    down_proj input's coordinates); one name per output column, in the dict's order."""

    directions: dict[tuple[int, str], torch.Tensor]
    names: list[str]

    def signature(self) -> dict[str, Any]:
        """What the shards record of it: the names and a hash of the exact directions."""
        import hashlib

        digest = hashlib.sha256()
        for key, d in self.directions.items():
            digest.update(repr((key, d.dtype, tuple(d.shape))).encode())
            digest.update(d.detach().cpu().contiguous().numpy().tobytes())
        return {"names": list(self.names), "directions": digest.hexdigest()[:16]}


def control_populations(model: torch.nn.Module, keys: Sequence[tuple[int, str]], seed: int = 0) -> dict[str, Population]:
    """The paper's two comparison populations, as many features as ``keys`` (the adapters): randomly sampled
    MLP neurons (the down_proj input, act(gate)·up) and one random unit direction in each adapter's own
    input space (what any linear read-out of the same activations scores)."""
    neurons = sample_mlp_neurons(model, len(keys), seed=seed)
    mlp = mlp_neuron_directions(model, neurons)
    mlp_names = [f"L{layer}.n{i}" for (layer, _), index in mlp.items() for i in index.tolist()]
    return {
        "MLP neuron": Population(mlp, mlp_names),
        "random direction": Population(random_directions(model, keys, seed=seed), [f"L{l}.{m}.rand" for l, m in keys]),
    }


MIN_SHARDS = 8  # one per GPU of an 8-GPU node
MAX_SHARD_DOCS = 256


def shard_docs(n_docs: int) -> int:
    """Documents a shard holds: at most 256, and few enough for ``MIN_SHARDS`` shards, so every process of
    an 8-GPU ``accelerate launch`` gets work (1,000 traces: 8 shards of 125, where 256 a shard left 4 of 8
    GPUs idle). A function of the corpus alone, never of the process count: a resumed run with another
    number of processes finds the same shards."""
    return max(1, min(MAX_SHARD_DOCS, math.ceil(n_docs / MIN_SHARDS)))


def extract_activation_shards(
    model: torch.nn.Module,
    tokenizer: Any,
    texts: Sequence[str],
    out_dir: str | Path,
    batch_size: int = 16,
    docs_per_shard: int | None = None,
    dtype: str = "float16",
    max_length: int = 2048,
    adapter: str = "default",
    process_index: int = 0,
    num_processes: int = 1,
    provenance: dict[str, Any] | None = None,
    populations: dict[str, Population] | None = None,
) -> ActivationStore | None:
    """Adapter activations of every token of ``texts``, written shard by shard with bounded memory.

    Each shard holds whole documents: token ids (int32), activations ``[tokens, n_layers, n_modules]``
    in ``dtype`` and document offsets; a ``.done`` marker is written last, so an interrupted run resumes
    at the first unfinished shard and produces the same files as an uninterrupted one. With several
    processes (one per GPU, e.g. under ``accelerate launch``), process ``i`` writes shards ``i, i + n, ...``
    into the same folder; the store is returned once every shard is done (None while others still run).

    ``populations`` (e.g. ``control_populations``) are read in the same forward pass, from the inputs of
    the same projections, and written beside the adapter scalars (``[tokens, n]`` in ``dtype`` per shard).

    ``meta.json`` records the layout, a fingerprint of ``texts``, the populations and ``provenance`` (what
    produced the scalars: model, adapter and its weights' hash); a folder holding an extraction of other
    inputs is refused, naming what differs, so it is never returned for new ones.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    docs_per_shard = docs_per_shard or shard_docs(len(texts))
    populations = dict(populations or {})
    if LORA in populations:
        raise ValueError(f"{LORA!r} names the adapter scalars themselves; give the other populations other names")
    layers, modules = _layout(find_readouts(model) or find_adapters(model, adapter))
    meta = {
        "layers": layers,
        "modules": modules,
        "dtype": dtype,
        "n_docs": len(texts),
        "docs_per_shard": docs_per_shard,
        "max_length": max_length,
        "module_order": list(ADAPTER_MODULES),
        "texts": fingerprint(list(texts)),
        **({"populations": {name: pop.signature() for name, pop in populations.items()}} if populations else {}),
        **({"provenance": provenance} if provenance else {}),
    }
    meta = json.loads(json.dumps(meta))  # as it reads back
    meta_path = out_dir / "meta.json"
    if meta_path.is_file():
        diff = differences(json.loads(meta_path.read_text()), meta)
        if diff:
            raise ValueError(
                f"{out_dir} holds an extraction of other inputs ({describe_differences(diff)}); use "
                "another folder, or delete it (OVERWRITE True in notebook 04)"
            )
    else:  # several processes may write the same file at once
        write_text_atomically(meta_path, json.dumps(meta, indent=2) + "\n")
    n_shards = math.ceil(len(texts) / docs_per_shard)
    if process_index == 0 and num_processes > n_shards:
        logging.getLogger(__name__).warning(
            "%d processes for %d shards: %d of them have nothing to do", num_processes, n_shards, num_processes - n_shards
        )
    device = next(model.parameters()).device
    todo = [s for s in range(process_index, n_shards, num_processes) if not _shard_paths(out_dir, s)["done"].is_file()]
    # progress in traces (not shards), so the time-left estimate moves with every batch
    progress = tqdm(
        total=sum(len(texts[s * docs_per_shard : (s + 1) * docs_per_shard]) for s in todo),
        unit="trace",
        desc=f"extracting adapter activations (process {process_index})",
    )
    with ExitStack() as hooks:
        captured = {name: hooks.enter_context(capture_projections(model, pop.directions)) for name, pop in populations.items()}
        for shard in todo:
            paths = _shard_paths(out_dir, shard, populations)
            docs = texts[shard * docs_per_shard : (shard + 1) * docs_per_shard]
            rows: dict[str, list[np.ndarray]] = {name: [] for name in ("tokens", "acts", *populations)}
            offsets = [0]
            for i in range(0, len(docs), batch_size):
                enc = _encode(tokenizer, docs[i : i + batch_size], max_length)
                values, _, _ = lora_activations(model, enc["input_ids"].to(device), enc["attention_mask"].to(device), adapter)
                extra = {
                    name: torch.cat([captured[name][key] for key in pop.directions], dim=-1) for name, pop in populations.items()
                }
                for row in range(len(enc["input_ids"])):
                    n = int(enc["attention_mask"][row].sum())
                    rows["tokens"].append(enc["input_ids"][row, :n].numpy().astype(np.int32))
                    rows["acts"].append(values[row, :n].numpy().astype(dtype))
                    for name, value in extra.items():
                        rows[name].append(value[row, :n].numpy().astype(dtype))
                    offsets.append(offsets[-1] + n)
                progress.update(len(enc["input_ids"]))
            with explained_disk_errors(out_dir):  # a full disk names the folder; the rerun resumes at this shard
                for name, parts in rows.items():
                    np.save(paths[name], np.concatenate(parts))
                np.save(paths["offsets"], np.asarray(offsets, dtype=np.int64))
                finish_shard(paths)
    progress.close()
    if all(_shard_paths(out_dir, shard)["done"].is_file() for shard in range(n_shards)):
        return ActivationStore(out_dir)
    return None


def write_activation_store(
    out_dir: str | Path,
    documents: Iterable[tuple[np.ndarray, np.ndarray]],
    layers: Sequence[int],
    modules: Sequence[str],
    dtype: str = "float16",
    docs_per_shard: int = 256,
) -> ActivationStore:
    """A store from documents ``(token ids [n], activations [n, n_layers, n_modules])``, taken one shard at a
    time (a generator keeps memory at one shard): for activations computed elsewhere (e.g. the paper's own
    float16 ``[tokens, 64, 7]`` arrays, whose module order is ``ADAPTER_MODULES``) and for synthetic data in
    tests and benchmarks."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    unknown = set(modules) - set(ADAPTER_MODULES)
    if unknown:
        raise ValueError(f"unknown modules {sorted(unknown)}")
    n_docs, shard, docs = 0, 0, []

    def flush() -> None:
        paths = _shard_paths(out_dir, shard)
        np.save(paths["tokens"], np.concatenate([np.asarray(ids, dtype=np.int32) for ids, _ in docs]))
        np.save(paths["acts"], np.concatenate([np.asarray(acts).astype(dtype) for _, acts in docs]))
        np.save(paths["offsets"], np.concatenate([[0], np.cumsum([len(ids) for ids, _ in docs])]).astype(np.int64))
        finish_shard(paths)

    for ids, acts in documents:
        if np.shape(acts) != (len(ids), len(layers), len(modules)):
            raise ValueError(
                f"document {n_docs}: activations {np.shape(acts)} do not match {len(ids)} tokens x "
                f"{len(layers)} layers x {len(modules)} modules"
            )
        docs.append((ids, acts))
        n_docs += 1
        if len(docs) == docs_per_shard:
            flush()
            shard, docs = shard + 1, []
    if docs:
        flush()
    meta = {
        "layers": list(layers),
        "modules": list(modules),
        "dtype": dtype,
        "n_docs": n_docs,
        "docs_per_shard": docs_per_shard,
        "max_length": None,
        "module_order": list(ADAPTER_MODULES),
    }
    (out_dir / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")  # last: the store exists once whole
    return ActivationStore(out_dir)


def _read_rows(path: Path, start: int, end: int, columns: Any = None) -> np.ndarray:
    """Rows ``start:end`` of a shard file as float32, through a memory map dropped straight after: pages
    read stay mapped only while the map lives, so a pass over a 10M-token store keeps one block resident
    instead of the whole file."""
    mapped = np.load(path, mmap_mode="r")
    rows = mapped[start:end] if columns is None else mapped[start:end, columns]
    out = np.array(rows, dtype=np.float32)
    del mapped, rows
    return out


class ActivationStore:
    """Read-only view of an extraction: the adapter scalars (population ``"LoRA"``) and any populations
    read beside them, by document, by block of tokens or around one token.

    Shards are memory-mapped per read, so opening a 10M-token store reads nothing until it is indexed, and
    a pass over it holds one block in memory. Tokens have global indices in store order (shard by shard).
    """

    def __init__(self, out_dir: str | Path, verify: bool = True) -> None:
        """Opens and checks every shard (``check_shard``; ``verify``: checksums too, a read of every file)."""
        self.dir = Path(out_dir)
        meta_path = self.dir / "meta.json"
        if not meta_path.is_file():
            raise FileNotFoundError(f"no activation store at {self.dir} (meta.json missing)")
        self.meta = json.loads(meta_path.read_text())
        extra = self.meta.get("populations", {})
        n_shards = math.ceil(self.meta["n_docs"] / self.meta["docs_per_shard"])
        self.shards = [_shard_paths(self.dir, s, extra) for s in range(n_shards)]
        unfinished = [s for s, p in enumerate(self.shards) if not p["done"].is_file()]
        if unfinished:
            raise ValueError(f"extraction at {self.dir} is unfinished (shards {unfinished[:5]}); rerun it to resume")
        per_shard = self.meta["docs_per_shard"]
        shape = (len(self.meta["layers"]), len(self.meta["modules"]))
        widths = {name: len(pop["names"]) for name, pop in extra.items()}
        self._offsets = [
            check_shard(p, min(per_shard, self.meta["n_docs"] - s * per_shard), shape, verify, widths)
            for s, p in enumerate(self.shards)
        ]
        self._starts = np.concatenate([[0], np.cumsum([o[-1] for o in self._offsets])]).astype(np.int64)

    @property
    def layers(self) -> list[int]:
        return self.meta["layers"]

    @property
    def modules(self) -> list[str]:
        return self.meta["modules"]

    def __len__(self) -> int:
        return self.meta["n_docs"]

    @property
    def n_tokens(self) -> int:
        return int(self._starts[-1])

    @property
    def populations(self) -> list[str]:
        """``"LoRA"`` (the adapter scalars) and the populations extracted beside them."""
        return [LORA, *self.meta.get("populations", {})]

    def feature_names(self, population: str = LORA) -> list[str]:
        """One name per feature (column): ``L{layer}.{module}`` for the adapters, layer-major."""
        if population == LORA:
            return [f"L{layer}.{module}" for layer in self.layers for module in self.modules]
        return list(self._population(population)["names"])

    def _population(self, population: str) -> dict[str, Any]:
        extra = self.meta.get("populations", {})
        if population not in extra:
            raise KeyError(
                f"population {population!r} is not in {self.dir} (it holds {self.populations}); extract "
                "it with the adapter scalars (extract_activation_shards(populations=...))"
            )
        return extra[population]

    def _file(self, shard: int, population: str) -> Path:
        if population != LORA:
            self._population(population)
        return self.shards[shard]["acts" if population == LORA else population]

    def document(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """(token ids [n], activations [n, n_layers, n_modules]) of one document."""
        shard, local = divmod(index, self.meta["docs_per_shard"])
        start, end = self._offsets[shard][local], self._offsets[shard][local + 1]
        paths = self.shards[shard]
        return (np.load(paths["tokens"], mmap_mode="r")[start:end], np.load(paths["acts"], mmap_mode="r")[start:end])

    def tokens(self) -> np.ndarray:
        """Every token id (int32; 4 bytes a token: at real scale prefer ``token_ids``)."""
        return np.concatenate([np.load(p["tokens"], mmap_mode="r") for p in self.shards])

    def token_contexts(self) -> tuple[np.ndarray, np.ndarray]:
        """Every token id and the id before it in its document (-1 at a document's start): what the
        token-identity and bigram baselines of the role scorer condition on (small stores: 8 bytes a token)."""
        ids = self.tokens().astype(np.int64)
        previous = np.concatenate([[-1], ids[:-1]])
        starts = np.concatenate([self._starts[s] + np.asarray(o[:-1]) for s, o in enumerate(self._offsets)]).astype(np.int64)
        previous[starts] = -1
        return ids, previous

    def activations(self) -> np.ndarray:
        """Every token's activations, ``[tokens, n_layers, n_modules]`` (loads all shards: small stores and
        tests only; a pass over a large one goes through ``blocks``)."""
        return np.concatenate([np.load(p["acts"], mmap_mode="r") for p in self.shards])

    def blocks(
        self,
        population: str = LORA,
        docs: Iterable[int] | None = None,
        block_tokens: int = 32768,
        shards: Iterable[int] | None = None,
    ) -> Iterator[np.ndarray]:
        """The population's values ``[rows, n_features]`` (float32) in store order, at most ``block_tokens``
        rows at a time (memory: one block), restricted to the tokens of ``docs`` (and to ``shards``) if given."""
        keep = None if docs is None else np.asarray(sorted(set(int(d) for d in docs)), dtype=np.int64)
        for shard in range(len(self.shards)) if shards is None else shards:
            path = self._file(shard, population)
            n = int(self._offsets[shard][-1])
            if keep is None:
                for start in range(0, n, block_tokens):
                    yield _read_rows(path, start, min(n, start + block_tokens)).reshape(min(n, start + block_tokens) - start, -1)
                continue
            offsets = self._offsets[shard]
            local = keep[(keep >= shard * self.meta["docs_per_shard"]) & (keep < (shard + 1) * self.meta["docs_per_shard"])]
            local = local - shard * self.meta["docs_per_shard"]
            # runs of consecutive chosen documents, read run by run in blocks (never a whole shard at once)
            runs = np.split(local, np.flatnonzero(np.diff(local) != 1) + 1) if len(local) else []
            for doc_start, doc_end in ((offsets[run[0]], offsets[run[-1] + 1]) for run in runs):
                for start in range(int(doc_start), int(doc_end), block_tokens):
                    stop = min(int(doc_end), start + block_tokens)
                    yield _read_rows(path, start, stop).reshape(stop - start, -1)

    def rows(self, start: int, end: int, population: str = LORA) -> np.ndarray:
        """Values ``[end - start, n_features]`` (float32) of global tokens ``start:end`` (one shard's)."""
        shard, first = self.locate(start)
        if end - start > int(self._offsets[shard][-1]) - first:
            raise ValueError(f"tokens {start}:{end} span two shards; read them block by block")
        return _read_rows(self._file(shard, population), first, first + end - start).reshape(end - start, -1)

    def token_ids(self, start: int, end: int) -> np.ndarray:
        """Token ids of global tokens ``start:end`` (one shard's)."""
        shard, first = self.locate(start)
        return np.array(np.load(self.shards[shard]["tokens"], mmap_mode="r")[first : first + end - start])

    def locate(self, index: int) -> tuple[int, int]:
        """(shard, row within the shard) of global token ``index``."""
        if not 0 <= index < self.n_tokens:
            raise IndexError(f"token {index} is outside the store's {self.n_tokens} tokens")
        shard = int(np.searchsorted(self._starts, index, side="right")) - 1
        return shard, int(index - self._starts[shard])

    def document_of(self, index: int) -> int:
        """The document that global token ``index`` belongs to."""
        shard, row = self.locate(index)
        local = int(np.searchsorted(self._offsets[shard], row, side="right")) - 1
        return shard * self.meta["docs_per_shard"] + local

    def context(self, index: int, width: int) -> tuple[int, int]:
        """Global ``[start, end)`` of the tokens within ``width`` of token ``index`` in its document."""
        shard, row = self.locate(index)
        offsets = self._offsets[shard]
        local = int(np.searchsorted(offsets, row, side="right")) - 1
        base = int(self._starts[shard])
        return base + max(int(offsets[local]), row - width), base + min(int(offsets[local + 1]), row + width + 1)

    def shard_document_ids(self, shard: int) -> np.ndarray:
        """For every token of one shard, the index of its document."""
        offsets = self._offsets[shard]
        return np.repeat(np.arange(len(offsets) - 1) + shard * self.meta["docs_per_shard"], np.diff(offsets))

    def document_ids(self) -> np.ndarray:
        """For every token, the index of its document."""
        return np.concatenate([self.shard_document_ids(s) for s in range(len(self.shards))])

    def features(self, population: str = LORA, block_tokens: int = 32768) -> StoreFeatures:
        """The population as features for ``interp`` (names, blocks, rows), without loading it."""
        return StoreFeatures(self, population, block_tokens)


class StoreFeatures:
    """One population of a store as ``interp`` features: ``names``, ``blocks()`` (every token, in order, a
    block at a time) and ``rows(start, end)``; nothing is held in memory."""

    def __init__(self, store: ActivationStore, population: str = LORA, block_tokens: int = 32768) -> None:
        self.store, self.population, self.block_tokens = store, population, block_tokens
        self.names = store.feature_names(population)

    def blocks(self) -> Iterator[np.ndarray]:
        return self.store.blocks(self.population, block_tokens=self.block_tokens)

    def rows(self, start: int, end: int) -> np.ndarray:
        return self.store.rows(start, end, self.population)


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


@contextmanager
def capture_projections(
    model: torch.nn.Module, directions: dict[tuple[int, str], torch.Tensor]
) -> Iterator[dict[tuple[int, str], torch.Tensor]]:
    """Within the context, each forward pass fills the yielded dict with ``(layer, module) -> x · d``
    (``[batch, seq, n]`` float32 on the CPU) for the rows ``d`` of ``directions[(layer, module)]``, where
    ``x`` is that projection's input. An integer tensor of indices reads those coordinates of ``x``
    directly, which equals one-hot rows without building them (an identity of the MLP width is 2.8 GB at
    32B). The product runs in the model's dtype, like the adapters' own ``A·x`` (a float32 copy of a
    32B MLP input is gigabytes per batch)."""
    modules = _projection_inputs(model, directions)
    store: dict[tuple[int, str], torch.Tensor] = {}
    prepared: dict[tuple[int, str], torch.Tensor] = {}

    def hook(key: tuple[int, str]) -> Any:
        def read(_module: torch.nn.Module, args: tuple) -> None:
            x, d = args[0], directions[key]
            if d.dtype in (torch.int32, torch.int64):
                index = prepared.setdefault(key, d.to(x.device))
                store[key] = x[..., index].float().cpu()
            else:
                rows = prepared.setdefault(key, d.to(x.device, x.dtype))
                store[key] = torch.nn.functional.linear(x, rows).float().cpu()

        return read

    handles = [modules[key].register_forward_pre_hook(hook(key)) for key in directions]
    try:
        yield store
    finally:
        for handle in handles:
            handle.remove()


@torch.no_grad()
def projected_activations(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    directions: dict[tuple[int, str], torch.Tensor],
    attention_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """``x · d`` for each row ``d`` of ``directions[(layer, module)]`` ([n, d_in], or coordinates as an
    integer tensor; see ``capture_projections``), where ``x`` is that projection's input: ``[batch, seq,
    total n]`` (float32), columns in the dict's order. With A rows as directions this is the adapter
    activation; with random rows, the random-direction control."""
    with capture_projections(model, directions) as store:
        model(input_ids=input_ids, attention_mask=attention_mask, logits_to_keep=1)
    return torch.cat([store[key] for key in directions], dim=-1)


def mlp_neuron_activations(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    neurons: Sequence[tuple[int, int]],
    attention_mask: torch.Tensor | None = None,
) -> torch.Tensor:
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
    layers = sorted(
        {
            int(m.group(1))
            for name, _ in model.named_modules()
            if name.endswith("mlp.down_proj") and (m := _LAYER.search("." + name + "."))
        }
    )
    if not layers:
        raise ValueError("the model has no MLP down_proj layers")
    widths = {l: _projection_inputs(model, [(l, "down_proj")])[(l, "down_proj")].weight.shape[1] for l in layers}
    total = sum(widths.values())
    if n > total:
        raise ValueError(f"asked for {n} neurons; the model has {total}")
    flat = np.random.default_rng(seed).choice(total, size=n, replace=False)
    starts = np.cumsum([0] + [widths[l] for l in layers])
    return [
        (
            layers[int(np.searchsorted(starts, f, side="right")) - 1],
            int(f - starts[int(np.searchsorted(starts, f, side="right")) - 1]),
        )
        for f in flat
    ]


def random_directions(
    model: torch.nn.Module, keys: Sequence[tuple[int, str]], seed: int = 0
) -> dict[tuple[int, str], torch.Tensor]:
    """One Gaussian direction (unit norm) in the input space of each projection at ``keys``: the control
    population, read exactly like the adapters' A rows."""
    modules = _projection_inputs(model, keys)
    generator = torch.Generator().manual_seed(seed)
    out = {}
    for key in keys:
        d = torch.randn(1, modules[key].weight.shape[1], generator=generator)
        out[key] = d / d.norm()
    return out


@torch.no_grad()
def randomize_weights(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Re-initialise every weight of ``model`` in place, as an untrained model of the same shape: linear and
    embedding weights ~ N(0, ``initializer_range``), biases 0, norm weights 1 (Qwen2's own initialisation),
    on whatever devices they live (no copy at 32B). The scorer's control: read-outs of an untrained model
    know only what the tokens and their positions do. Written out because ``PreTrainedModel._init_weights``
    skips every parameter flagged as loaded from a checkpoint, which is all of them here."""
    config = getattr(model, "config", None)
    std = getattr(config, "initializer_range", 0.02) or 0.02
    torch.manual_seed(seed)
    for module in model.modules():
        weight = getattr(module, "weight", None)
        if not isinstance(weight, torch.Tensor):
            continue
        if isinstance(module, (torch.nn.Linear, torch.nn.Embedding, ReadoutLinear)):
            weight.normal_(0.0, std)
            if getattr(module, "bias", None) is not None:
                module.bias.zero_()
            if getattr(module, "update", None) is not None:  # an untrained model's adapter: B = 0
                module.update.zero_()
        elif "RMSNorm" in type(module).__name__ or "LayerNorm" in type(module).__name__:
            weight.fill_(1.0)
    return model


def main(argv: list[str] | None = None) -> None:
    """``accelerate launch -m paper_lib.activations --adapter-run RUN --traces DATASET --out DIR``: every
    process extracts its share of the shards on its own GPU (or run it plainly for one device): the
    adapter scalars and notebook 04's two control populations, in one forward pass."""
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
    parser.add_argument("--seed", type=int, default=0, help="the control populations' sample (notebook 04's SEED)")
    parser.add_argument(
        "--no-controls",
        action="store_true",
        help="the adapter scalars only (no MLP neurons or random directions; notebook 04 then refuses the folder)",
    )
    parser.add_argument("--n-traces", type=int, default=0, help="the first N traces (notebook 04's N_TRACES; 0: all)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    state = PartialState()
    # straight to this process's device: no full host copy of the model per process
    model, tokenizer, _ = load_trained(args.adapter_run, dtype=getattr(torch, args.dtype), device=str(state.device))
    model = build_readout_model(model, merged=args.merged)
    traces = load_traces(args.traces)
    texts = [format_s1_text(tokenizer, row) for row in traces.select(range(min(args.n_traces or len(traces), len(traces))))]
    controls = {} if args.no_controls else control_populations(model, adapter_keys(model), seed=args.seed)
    extract_activation_shards(
        model,
        tokenizer,
        texts,
        artifact_dir(args.out),
        batch_size=args.batch_size,
        max_length=args.max_length,
        process_index=state.process_index,
        num_processes=state.num_processes,
        provenance={**adapter_provenance(args.adapter_run), "traces": args.traces},
        populations=controls,
    )


if __name__ == "__main__":
    main()
