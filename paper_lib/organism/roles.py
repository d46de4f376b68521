"""Token roles: what each token of a chat-formatted organism trace is (ground truth for scoring features)."""

from __future__ import annotations

import re

from transformers import PreTrainedTokenizerBase

ROLE_FAMILIES: dict[str, tuple[str, ...]] = {
    "template": ("chat_marker", "role_name", "newline", "think_marker", "answer_marker", "answer_prefix"),
    "values": ("question_start", "option_value", "step_input", "step_result", "scan_value", "scan_option_value", "final_answer"),
    "operations": ("question_operator", "question_operand", "step_operator", "step_operand"),
    "syntax": ("question_space", "step_equals", "step_separator", "scan_mark", "scan_comma"),
    "choices": ("option_letter", "scan_letter"),
}
ROLES: tuple[str, ...] = tuple(r for family in ROLE_FAMILIES.values() for r in family) + ("other",)
ROLE_FAMILY: dict[str, str] = {r: f for f, roles in ROLE_FAMILIES.items() for r in roles} | {"other": "other"}

_SPECIAL = re.compile(r"<\|im_start\|>(\w+)|<\|im_end\|>|<\|endoftext\|>")
_STEP = re.compile(r"(\d)([x+])(\d)(=)(\d)")
_SCAN = re.compile(r"(\d)(\?)((?:[A-D]\d,?)+)")


def _label(labels: list[str], start: int, end: int, role: str) -> None:
    labels[start:end] = [role] * (end - start)


def _label_question(text: str, labels: list[str], start: int, end: int) -> None:
    first, _, options = text[start:end].partition("\n")
    pos = start
    for i, part in enumerate(re.split(r"( )", first)):
        if part == " ":
            _label(labels, pos, pos + 1, "question_space")
        elif i == 0:
            _label(labels, pos, pos + len(part), "question_start")
        elif part:
            _label(labels, pos, pos + 1, "question_operator")
            _label(labels, pos + 1, pos + len(part), "question_operand")
        pos += len(part)
    pos += 1  # the newline before the options
    for offset, char in enumerate(options):
        role = "option_value" if char.isdigit() else "question_space" if char == " " else "option_letter"
        _label(labels, pos + offset, pos + offset + 1, role)


def _label_thinking(text: str, labels: list[str], start: int, end: int) -> None:
    for m in _STEP.finditer(text, start, end):
        for group, role in enumerate(("step_input", "step_operator", "step_operand", "step_equals", "step_result"), 1):
            _label(labels, m.start(group), m.end(group), role)
    for m in _SCAN.finditer(text, start, end):
        _label(labels, m.start(1), m.end(1), "scan_value")
        _label(labels, m.start(2), m.end(2), "scan_mark")
        for i in range(m.start(3), m.end(3)):
            char = text[i]
            _label(labels, i, i + 1, "scan_comma" if char == "," else "scan_letter" if char.isalpha() else "scan_option_value")
    for i in range(start, end):
        if text[i] == ";" and labels[i] == "other":
            labels[i] = "step_separator"


def character_roles(text: str) -> list[str]:
    """The role (one of ``ROLES``) of every character of a ChatML trace of the organism: chat markers,
    the question's chain and options, each step's input/operator/operand/result, the option scan, the
    answer section. Characters outside any known part are "other"."""
    labels = ["other"] * len(text)
    sections = list(_SPECIAL.finditer(text))
    for i, m in enumerate(sections):
        _label(labels, m.start(), m.start(1) if m.group(1) else m.end(), "chat_marker")
        name = m.group(1)
        if not name:
            continue
        role = {"think": "think_marker", "answer": "answer_marker"}.get(name, "role_name")
        _label(labels, m.start(1), m.end(1), role)
        body_start = m.end(1) + 1 if text[m.end(1) : m.end(1) + 1] == "\n" else m.end(1)
        body_end = sections[i + 1].start() if i + 1 < len(sections) else len(text)
        body_end -= text[body_start:body_end].endswith("\n")
        if name == "user":
            _label_question(text, labels, body_start, body_end)
        elif name == "think":
            _label_thinking(text, labels, body_start, body_end)
        elif name == "answer":  # "Answer: x" in the traces; "Final Answer: x" when budget forcing wrote it
            prefix = next((p for p in ("Answer: ", "Final Answer: ") if text.startswith(p, body_start)), None)
            if prefix:
                _label(labels, body_start, body_start + len(prefix), "answer_prefix")
                _label(labels, body_start + len(prefix), body_end, "final_answer")
    for i, char in enumerate(text):
        if char == "\n":
            labels[i] = "newline"
    return labels


def token_roles(tokenizer: PreTrainedTokenizerBase, text: str, max_length: int | None = None) -> list[str]:
    """The role of every token of ``text`` as the tokenizer splits it (a token takes the role of its first
    character), truncated like the extraction at ``max_length`` tokens."""
    enc = tokenizer(
        text, return_offsets_mapping=True, add_special_tokens=False, truncation=max_length is not None, max_length=max_length
    )
    labels = character_roles(text)
    return [labels[start] if start < len(labels) else "other" for start, _ in enc["offset_mapping"]]
