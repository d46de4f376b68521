"""A rank-1 adapter on a copy of a model, with non-zero B so that the adapters act (as a trained one's
do): the shared starting point of the activation, ablation and splice tests."""

import copy

import torch
from peft import get_peft_model

from paper_lib.training import LoraSpec, build_lora_config


def random_lora(model, spec: LoraSpec | None = None, seed: int = 0):
    peft_model = get_peft_model(copy.deepcopy(model), build_lora_config(spec or LoraSpec(), model.config))
    torch.manual_seed(seed)
    for name, p in peft_model.named_parameters():
        if "lora_B" in name:
            p.data.normal_(0, 0.05)
    return peft_model.eval()
