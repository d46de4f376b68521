"""Token roles: what each token of a chat-formatted organism trace is (ground truth for scoring features)."""

from __future__ import annotations

import re
from collections.abc import Iterable

from transformers import PreTrainedTokenizerBase

ROLE_FAMILIES: dict[str, tuple[str, ...]] = {
    "template": ("chat_marker", "role_name", "newline", "think_marker", "answer_marker", "answer_prefix"),
    "values": ("question_start", "option_value", "step_input", "step_result", "scan_value", "scan_option_value", "final_answer"),
    "operations": ("question_operator", "question_operand", "step_operator", "step_operand"),
    "syntax": ("question_space", "step_equals", "step_separator", "scan_mark", "scan_comma"),
    "choices": ("option_letter", "scan_letter"),
}
# Organism 2 (the registers task): roles that say what is going on, beyond which token it is, grouped by the
# paper's seven SAE categories (figure 3's donut), plus the template. Named apart from organism 1's roles, so
# that each role has one family (tests/test_registers.py checks it).
REGISTER_ROLE_FAMILIES: dict[str, tuple[str, ...]] = {
    "computational operations": ("computed_value", "wrapped_value", "step_op", "step_fact"),
    "symbolic manipulation": ("copied_value", "copy_source", "copy_mark"),
    "variable/value tracking": ("carried_value", "start_value", "state_register", "step_register", "read_register"),
    "reasoning flow control": ("wait_word", "before_wait", "confirm_word", "erroneous_value", "step_mark", "step_break"),
    "domain-specific patterns": (
        "program_register",
        "program_value",
        "program_operator",
        "program_operand",
        "program_space",
        "program_target",
    ),
    "relational/logical operators": ("read_mark", "choice_letter", "choice_value", "eliminated_option", "scan_test"),
    "result formulation": ("final_read_value", "chosen_option", "answer_intro", "answer_value"),
}
ROLES: tuple[str, ...] = tuple(
    dict.fromkeys(r for families in (ROLE_FAMILIES, REGISTER_ROLE_FAMILIES) for f in families.values() for r in f)
) + ("other",)
ROLE_FAMILY: dict[str, str] = {
    r: f for families in (ROLE_FAMILIES, REGISTER_ROLE_FAMILIES) for f, roles in families.items() for r in roles
} | {"other": "other"}

# What a completion to an AIME-like question holds (thinking and answer, no options), and the role that
# marks each written step, per organism (steering measures them on generated text).
COMPLETION_ROLES: dict[str, frozenset[str]] = {
    "chains": frozenset(
        ("step_input", "step_operator", "step_operand", "step_equals", "step_result", "step_separator")
        + ("final_answer", "answer_prefix", "answer_marker", "think_marker")
    ),
    "registers": frozenset(
        r
        for family, roles in REGISTER_ROLE_FAMILIES.items()
        if family != "domain-specific patterns"  # the program: the question's, not the completion's
        for r in roles
        if r not in ("choice_letter", "choice_value", "eliminated_option", "chosen_option", "scan_test")
    )
    | {"answer_marker", "think_marker"},
}
STEP_ROLES = {"chains": "step_result", "registers": "step_mark"}


def organism_of_roles(roles: Iterable[str]) -> str:
    """Which organism's traces carry these roles: "registers" if any is organism 2's, else "chains"."""
    register_roles = {r for family in REGISTER_ROLE_FAMILIES.values() for r in family}
    return "registers" if any(r in register_roles for r in set(roles)) else "chains"


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


_PROGRAM = re.compile(r"a\d b\d( [ab](?:[x+]\d|<[ab]))* \?[ab]")
_STATE = re.compile(r"a(\d)b(\d)")
_REGISTER_STEP = re.compile(r"([ab])([x+])(\d):|([ab])(<)([ab]):")
_READ = re.compile(r"(\?)([ab]):(\d)")


def _label_program(text: str, labels: list[str], start: int, end: int) -> None:
    first, _, options = text[start:end].partition("\n")
    pos = start
    for part in re.split(r"( )", first):
        if part == " ":
            _label(labels, pos, pos + 1, "program_space")
        elif part.startswith("?"):
            _label(labels, pos, pos + len(part), "program_target")
        elif len(part) == 2:  # a start value: a7
            _label(labels, pos, pos + 1, "program_register")
            _label(labels, pos + 1, pos + 2, "program_value")
        elif part:
            _label(labels, pos, pos + 1, "program_register")
            _label(labels, pos + 1, pos + 2, "program_operator")
            _label(labels, pos + 2, pos + 3, "program_operand")
        pos += len(part)
    pos += 1
    for offset, char in enumerate(options):
        role = "choice_value" if char.isdigit() else "program_space" if char == " " else "choice_letter"
        _label(labels, pos + offset, pos + offset + 1, role)


def _label_register_thinking(text: str, labels: list[str], start: int, end: int) -> None:
    """Each state's digits by why they are there (the start, carried, computed, wrapped past 10, copied, or a
    slip that the next line repairs), each step's parts, the final read, "Wait" and what surrounds it, and
    the option scan (options eliminated, the one chosen)."""
    lines, pos, committed = text[start:end].split("\n"), start, []  # the states the trace stands by
    for n, line in enumerate(lines):
        slipped = n + 1 < len(lines) and lines[n + 1].startswith("Wait") and not lines[n + 1].endswith(" ok")
        check = line.startswith("Wait") and line.endswith(" ok")  # re-derives the step before: not a new state
        body = line
        if line.startswith("Wait"):
            _label(labels, pos, pos + 5, "wait_word")  # "Wait "
            if check:
                _label(labels, pos + len(line) - 2, pos + len(line), "confirm_word")
        if n + 1 < len(lines) and lines[n + 1].startswith("Wait"):
            _label(labels, pos + len(line), pos + len(line) + 1, "before_wait")
        steps = list(_REGISTER_STEP.finditer(body))
        for m in _STATE.finditer(body):
            s = pos + m.start()
            _label(labels, s, s + 1, "state_register")
            _label(labels, s + 2, s + 3, "state_register")
            state = {"a": int(m.group(1)), "b": int(m.group(2))}
            step = next((x for x in reversed(steps) if x.end() <= m.start()), None)
            previous = committed[-2] if check and len(committed) > 1 else committed[-1] if committed else None
            if previous is None or step is None:
                roles = {"a": "start_value", "b": "start_value"}
            else:
                register = step.group(1) or step.group(4)
                roles = {r: "carried_value" for r in "ab"}
                if step.group(5):  # a copy
                    roles[register] = "copied_value"
                else:
                    before, op, d = previous[register], step.group(2), int(step.group(3))
                    raw = before + d if op == "+" else before * d
                    roles[register] = "wrapped_value" if raw >= 10 else "computed_value"
                    if slipped and step is steps[-1] and state[register] != raw % 10:
                        roles[register] = "erroneous_value"
            _label(labels, s + 1, s + 2, roles["a"])
            _label(labels, s + 3, s + 4, roles["b"])
            if not check and "erroneous_value" not in roles.values():
                committed.append(state)
        for m in steps:
            s = pos + m.start()
            if m.group(5):
                _label(labels, s, s + 1, "step_register")
                _label(labels, s + 1, s + 2, "copy_mark")
                _label(labels, s + 2, s + 3, "copy_source")
            else:
                _label(labels, s, s + 1, "step_register")
                _label(labels, s + 1, s + 2, "step_op")
                _label(labels, s + 2, s + 3, "step_fact")
            _label(labels, s + len(m.group(0)) - 1, s + len(m.group(0)), "step_mark")
        for m in _READ.finditer(body):
            s = pos + m.start()
            _label(labels, s, s + 1, "read_mark")
            _label(labels, s + 1, s + 2, "read_register")
            _label(labels, s + 2, s + 3, "step_mark")
            _label(labels, s + 3, s + 4, "final_read_value")
        for m in _SCAN.finditer(body):
            s = pos + m.start()
            _label(labels, s, s + 1, "final_read_value")
            _label(labels, s + 1, s + 2, "scan_test")
            options = m.group(3).split(",")
            at = s + m.start(3) - m.start()
            for i, option in enumerate(options):
                _label(labels, at, at + len(option), "chosen_option" if i == len(options) - 1 else "eliminated_option")
                if i + 1 < len(options):
                    _label(labels, at + len(option), at + len(option) + 1, "scan_test")  # the comma: test the next
                at += len(option) + 1
        for i in range(pos, pos + len(body)):
            if text[i] == ";" and labels[i] == "other":
                labels[i] = "step_break"
        pos += len(line) + 1


def character_roles(text: str) -> list[str]:
    """The role (one of ``ROLES``) of every character of a ChatML trace of the organism: chat markers,
    the question's chain and options, each step's input/operator/operand/result, the option scan, the
    answer section. Characters outside any known part are "other"."""
    labels = ["other"] * len(text)
    registers = False  # organism 2's traces, told by their question
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
            registers = bool(_PROGRAM.match(text, body_start))
            (_label_program if registers else _label_question)(text, labels, body_start, body_end)
        elif name == "think":
            (_label_register_thinking if registers else _label_thinking)(text, labels, body_start, body_end)
        elif name == "answer":  # "Answer: x" (organism 1's traces) or "Final Answer: x" (organism 2's; budget forcing)
            prefix = next((p for p in ("Answer: ", "Final Answer: ") if text.startswith(p, body_start)), None)
            if prefix:
                _label(labels, body_start, body_start + len(prefix), "answer_intro" if registers else "answer_prefix")
                _label(labels, body_start + len(prefix), body_end, "answer_value" if registers else "final_answer")
    for i, char in enumerate(text):
        if char == "\n" and labels[i] != "before_wait":
            labels[i] = "newline"
    return labels


def tokens_with_roles(
    tokenizer: PreTrainedTokenizerBase, text: str, max_length: int | None = None
) -> tuple[list[int], list[str]]:
    """The token ids of ``text`` and each token's role (a token takes the role of its first character), from
    one tokenization, truncated like the extraction at ``max_length`` tokens."""
    enc = tokenizer(
        text, return_offsets_mapping=True, add_special_tokens=False, truncation=max_length is not None, max_length=max_length
    )
    labels = character_roles(text)
    return enc["input_ids"], [labels[start] if start < len(labels) else "other" for start, _ in enc["offset_mapping"]]


def token_roles(tokenizer: PreTrainedTokenizerBase, text: str, max_length: int | None = None) -> list[str]:
    """The role of every token of ``text`` as the tokenizer splits it (``tokens_with_roles``)."""
    return tokens_with_roles(tokenizer, text, max_length)[1]


def role_table(tokenizer: PreTrainedTokenizerBase, texts: Iterable[str]) -> list[dict[str, object]]:
    """Every role that occurs in ``texts`` with its family, its token count and one example token: the
    ground truth behind figures 2-3, as a reader looks it up (most frequent first)."""
    from collections import Counter

    counts: Counter[str] = Counter()
    example: dict[str, str] = {}
    for text in texts:
        for token_id, role in zip(*tokens_with_roles(tokenizer, text)):
            counts[role] += 1
            example.setdefault(role, tokenizer.decode([token_id]))
    return [
        {"role": role, "family": ROLE_FAMILY.get(role, "other"), "tokens": n, "example": example[role]}
        for role, n in counts.most_common()
    ]


def roles_html(tokenizer: PreTrainedTokenizerBase, text: str) -> str:
    """HTML: ``text`` token by token, each coloured by its role's family, the role shown on hover and
    under the token; a legend of the families present."""
    import html

    palette = ["#e6550d", "#3182bd", "#31a354", "#756bb1", "#de2d26", "#636363", "#fd8d3c", "#6baed6", "#74c476", "#9e9ac8"]
    ids, roles = tokens_with_roles(tokenizer, text)
    families = list(dict.fromkeys(ROLE_FAMILY.get(r, "other") for r in roles))
    colour = {f: palette[i % len(palette)] for i, f in enumerate(families)}
    spans = []
    for token_id, role in zip(ids, roles):
        token = html.escape(tokenizer.decode([token_id]).replace("\n", "↵"))
        c = colour[ROLE_FAMILY.get(role, "other")]
        spans.append(
            f'<span title="{role}" style="display:inline-block;border-bottom:3px solid {c};margin:1px;text-align:center">'
            f'<span style="font-family:monospace">{token}</span><br><span style="font-size:60%;color:{c}">{role}</span></span>'
        )
    legend = " ".join(f'<span style="color:{colour[f]}">■ {html.escape(f)}</span>' for f in families)
    return f"<p>{legend}</p><div>{''.join(spans)}</div>"
