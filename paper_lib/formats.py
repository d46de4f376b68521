"""The formats every stage shares, defined once: ChatML prompts, s1's think/answer markers, the answer
letters of multiple-choice questions, and the names and orders of the adapted projections."""

from __future__ import annotations

from typing import Any

# ChatML's special tokens (Qwen2.5's), and the ones a turn or a document ends at (generation stops there)
IM_START, IM_END, ENDOFTEXT = "<|im_start|>", "<|im_end|>", "<|endoftext|>"
END_MARKERS = (IM_END, ENDOFTEXT)
# s1's assistant turn: <|im_start|>think\n{trajectory}\n<|im_start|>answer\n{attempt}
THINK, ANSWER = IM_START + "think", IM_START + "answer"
LETTERS = "ABCD"  # multiple-choice options, in the order shown

ATTENTION_MODULES: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_MODULES: tuple[str, ...] = ("gate_proj", "up_proj", "down_proj")
ALL_MODULES: tuple[str, ...] = ATTENTION_MODULES + MLP_MODULES  # the order PEFT targets them in
MODULE_SETS = {"all": ALL_MODULES, "attention": ATTENTION_MODULES, "mlp": MLP_MODULES}
# The paper's storage order (their [tokens, 64, 7] arrays): MLP first, then attention.
ADAPTER_MODULES: tuple[str, ...] = MLP_MODULES + ATTENTION_MODULES


def chat_messages(question: str, answer: str | None = None) -> list[dict[str, str]]:
    """A user turn, and the assistant's if given."""
    messages = [{"role": "user", "content": question}]
    if answer is not None:
        messages.append({"role": "assistant", "content": answer})
    return messages


def chat_prompt(tokenizer: Any, question: str) -> str:
    """The prompt that asks ``question`` through the tokenizer's chat template, ready for the reply."""
    return tokenizer.apply_chat_template(chat_messages(question), tokenize=False, add_generation_prompt=True)
