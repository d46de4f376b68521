"""The organism's tokenizer: one token per byte plus Qwen's special tokens, under Qwen2.5's ChatML
template."""

from __future__ import annotations

from typing import Any

from transformers import GenerationConfig, PreTrainedTokenizerBase, Qwen2Config, Qwen2ForCausalLM, Qwen2Tokenizer
from transformers.convert_slow_tokenizer import bytes_to_unicode

from paper_lib.formats import END_MARKERS, ENDOFTEXT, IM_END, IM_START

# ChatML as Qwen2.5 writes it, minus the default system prompt (it would triple the organism's sequence
# length). The {% generation %} markers let TRL compute an assistant-only loss mask.
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' }}"
    "{%- if message['role'] == 'assistant' %}"
    "{% generation %}{{- message['content'] + '<|im_end|>' }}{% endgeneration %}{{- '\\n' }}"
    "{%- else %}"
    "{{- message['content'] + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


# ----------------------------------------------------------------------------------------------------
# The tokenizer


def build_tokenizer() -> Qwen2Tokenizer:
    """A byte-level BPE tokenizer with no merges (one token per byte) and Qwen's special tokens.

    Built as ``Qwen2Tokenizer`` because transformers loads any ``qwen2`` folder with that class, which
    imposes Qwen's normalizer and pre-tokenizer; building with the same class makes a reload identical.
    """
    vocab = {char: i for i, char in enumerate(bytes_to_unicode().values())}
    for token in (ENDOFTEXT, IM_START, IM_END):
        vocab[token] = len(vocab)
    tokenizer = Qwen2Tokenizer(vocab=vocab, merges=[], model_max_length=32768)
    tokenizer.add_special_tokens({"additional_special_tokens": [IM_START, IM_END]})
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def chat_model(tokenizer: PreTrainedTokenizerBase, **shape: Any) -> Qwen2ForCausalLM:
    """A randomly initialised ``Qwen2ForCausalLM`` of ``shape`` (Qwen2Config fields) that stops like
    Qwen2.5-Instruct, at ``<|im_end|>`` or ``<|endoftext|>``, and generates greedily by default."""
    eos = [tokenizer.convert_tokens_to_ids(t) for t in END_MARKERS]
    config = Qwen2Config(**shape, bos_token_id=None, eos_token_id=eos, pad_token_id=tokenizer.pad_token_id)
    model = Qwen2ForCausalLM(config)
    model.generation_config = GenerationConfig(eos_token_id=eos, pad_token_id=tokenizer.pad_token_id, do_sample=False)
    return model
