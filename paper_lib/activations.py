"""LoRA activations: the scalar a = A·x of every adapter, per token.

For an adapted projection W, PEFT computes W·x + scale · B(A·x). A rank-1 adapter's activation is the
scalar A·x at the module's input, before the rsLoRA scale (B is not involved): q, k, v read the
input-layernorm output, gate and up the post-attention-layernorm output, o the concatenated heads,
down act(gate)·up. We read it off the ``lora_A`` submodule's output with forward hooks.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from peft.tuners.lora import LoraLayer

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


def adapter_layout(model: torch.nn.Module, adapter: str = "default") -> tuple[list[int], list[str]]:
    """The adapted layer indices and module names (in ``ADAPTER_MODULES`` order) that activations cover."""
    keys = find_adapters(model, adapter)
    layers = sorted({layer for layer, _ in keys})
    modules = [m for m in ADAPTER_MODULES if any(k[1] == m for k in keys)]
    return layers, modules


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
    layers, modules = adapter_layout(model, adapter)
    keys = find_adapters(model, adapter)
    if any(m.r[adapter] != 1 for m in keys.values()):
        raise ValueError("lora_activations reads rank-1 adapters; this adapter has rank > 1")
    with capture_lora_activations(model, adapter) as store:
        model(input_ids=input_ids, attention_mask=attention_mask)
    batch, seq = input_ids.shape
    out = torch.full((batch, seq, len(layers), len(modules)), float("nan"))
    for (layer, module), value in store.items():
        out[:, :, layers.index(layer), modules.index(module)] = value[..., 0].float().cpu()
    if torch.isnan(out).any():  # a (layer, module) pair absent in some layers only: say so, do not hide it
        missing = [(l, m) for l in layers for m in modules if (l, m) not in keys]
        raise ValueError(f"adapters are not rectangular over layers x modules; missing {missing[:5]}")
    return out, layers, modules
