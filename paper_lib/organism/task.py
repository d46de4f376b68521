"""The organism's task: chains of operations mod 10, their problems, and how they are written (the
textbook document, the chat answer, s1's thinking turn) and read back."""

from __future__ import annotations

import dataclasses
import random
import re
from collections.abc import Sequence
from typing import Any

from transformers import PreTrainedTokenizerBase

from paper_lib.formats import ENDOFTEXT, IM_END, IM_START, LETTERS, chat_messages

OPS: tuple[str, ...] = ("+1", "+2", "x2", "x3")


# ----------------------------------------------------------------------------------------------------
# The task


class Answered:
    """What every organism problem derives from its ``value``, ``chain`` and ``choices``: the answer (the
    option letter of a multiple-choice variant), the question text, and the scan that finds the option."""

    value: int
    chain: str
    choices: tuple[int, ...]

    def check_choices(self) -> None:
        if self.choices and (len(set(self.choices)) != 4 or self.value not in self.choices):
            raise ValueError(f"choices {self.choices} must be 4 distinct values including the answer {self.value}")

    @property
    def letter(self) -> str:
        return LETTERS[self.choices.index(self.value)]

    @property
    def answer(self) -> str:
        return self.letter if self.choices else str(self.value)

    @property
    def question(self) -> str:
        if not self.choices:
            return self.chain
        return self.chain + "\n" + format_choices([str(c) for c in self.choices])

    def scan_text(self) -> str:
        """Scan the options in order until one equals the value; its letter is the answer (``9?A3,B9``)."""
        scan = [f"{LETTERS[i]}{c}" for i, c in enumerate(self.choices[: self.choices.index(self.value) + 1])]
        return f"{self.value}?" + ",".join(scan)


@dataclasses.dataclass(frozen=True)
class Problem(Answered):
    """One chain problem. ``choices`` holds the four option values (A-D) of a multiple-choice variant."""

    start: int
    ops: tuple[str, ...]
    choices: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if not 0 <= self.start <= 9:
            raise ValueError(f"start must be a digit, got {self.start}")
        for op in self.ops:
            apply_op(0, op)  # raises on an unknown op
        self.check_choices()

    @property
    def k(self) -> int:
        return len(self.ops)

    @property
    def completion_room(self) -> int:
        """Tokens a greedy completion of this problem gets when the organism is scored (room for the steps)."""
        return 8 * self.k + 40

    @property
    def key(self) -> tuple[int, tuple[str, ...]]:
        """Identity of the underlying chain (a multiple-choice variant shares it)."""
        return (self.start, self.ops)

    def values(self) -> list[int]:
        out = [self.start]
        for op in self.ops:
            out.append(apply_op(out[-1], op))
        return out

    @property
    def value(self) -> int:
        return self.values()[-1]

    @property
    def chain(self) -> str:
        return " ".join([str(self.start), *self.ops])

    @property
    def steps(self) -> str:
        vals = self.values()
        parts = [f"{a}{op}={b}" for a, op, b in zip(vals[:-1], self.ops, vals[1:])]
        if self.choices:
            parts.append(self.scan_text())
        return ";".join(parts)


def apply_op(value: int, op: str) -> int:
    """One step of the table: ``+d`` adds, ``xd`` multiplies, mod 10."""
    if op not in OPS:
        raise ValueError(f"unknown op {op!r}; known: {OPS}")
    d = int(op[1])
    return (value + d) % 10 if op[0] == "+" else (value * d) % 10


def format_choices(options: Sequence[str]) -> str:
    """The organism's multiple-choice block, ``(A) 3 (B) 9 (C) 0 (D) 5``."""
    return " ".join(f"({LETTERS[i]}) {o}" for i, o in enumerate(options))


def with_choices(rng: random.Random, problem: Any) -> Any:
    """A multiple-choice variant of ``problem``: its value and three other digits, in random order."""
    distractors = rng.sample([d for d in range(10) if d != problem.value], 3)
    choices = [problem.value, *distractors]
    rng.shuffle(choices)
    return dataclasses.replace(problem, choices=tuple(choices))


def sample_problem(rng: random.Random, k: int, multiple_choice: bool = False) -> Problem:
    ops = tuple(rng.choice(OPS) for _ in range(k))
    problem = Problem(rng.randrange(10), ops)
    return with_choices(rng, problem) if multiple_choice else problem


def n_distinct_chains(k: int) -> int:
    return 10 * len(OPS) ** k


def sample_distinct(
    rng: random.Random,
    k: int,
    n: int,
    exclude: set[tuple[int, tuple[str, ...]]],
    multiple_choice: bool = False,
) -> list[Problem]:
    """``n`` problems with distinct chains of length ``k``, none in ``exclude`` (which is updated)."""
    available = n_distinct_chains(k) - sum(1 for key in exclude if len(key[1]) == k)
    if n > available:
        raise ValueError(f"only {available} unused chains of length {k}; asked for {n}")
    out: list[Problem] = []
    while len(out) < n:
        problem = sample_problem(rng, k, multiple_choice)
        if problem.key not in exclude:
            exclude.add(problem.key)
            out.append(problem)
    return out


# ----------------------------------------------------------------------------------------------------
# Formats


def textbook_prompt(problem: Problem) -> str:
    return f"Q {problem.question}\nthink\n"


def textbook_document(problem: Problem) -> str:
    return f"{textbook_prompt(problem)}{problem.steps}\nanswer\nAnswer: {problem.answer}{ENDOFTEXT}"


def direct_answer(problem: Problem) -> str:
    """What the organism's assistant says in pretraining chat: the answer, no steps."""
    return f"Answer: {problem.answer}"


def thinking_answer(problem: Problem) -> str:
    """The s1 assistant turn for a problem: think section, then the answer section."""
    return f"{IM_START}think\n{problem.steps}\n{IM_START}answer\nAnswer: {problem.answer}"


def chat_document(tokenizer: PreTrainedTokenizerBase, problem: Problem) -> str:
    text = tokenizer.apply_chat_template(chat_messages(problem.question, direct_answer(problem)), tokenize=False)
    return text + ENDOFTEXT


_CHAT_ANSWER = re.compile(r"Answer:\s*([^\s<]+)")


def parse_textbook_answer(completion: str) -> str | None:
    """The answer after the ``answer`` line of a textbook completion; None when there is none."""
    text = completion.split(ENDOFTEXT)[0].split("\nQ ")[0]
    if "\nanswer\n" not in text:
        return None
    matches = _CHAT_ANSWER.findall(text.split("\nanswer\n")[-1])
    return matches[-1] if matches else None


def parse_chat_answer(completion: str) -> str | None:
    """The answer after the last ``Answer:`` of the final (post-think) section; None when there is none."""
    text = completion.split(IM_END)[0]
    if f"{IM_START}answer" in text:
        text = text.split(f"{IM_START}answer")[-1]
    matches = _CHAT_ANSWER.findall(text)
    return matches[-1] if matches else None


def parse_chain(text: str) -> Problem:
    """The problem written as ``7 +2 x2 +1`` (the first line of a question)."""
    parts = text.split("\n")[0].split()
    try:
        problem = Problem(int(parts[0]), tuple(parts[1:]))
    except (IndexError, ValueError) as err:
        raise ValueError(f"not an organism chain: {text!r}") from err
    return problem


# ----------------------------------------------------------------------------------------------------
# The task as the builder sees it (organism 2's registers task has the same methods)


class ChainTask:
    """Organism 1: one carried value, a chain of facts. What ``build`` needs of a task: sampling (distinct
    problems of a length, and how many exist), parsing a question back, a trace's thinking text, and the
    metadata a trace row carries."""

    name = "chains"

    def sample(self, rng: random.Random, k: int, multiple_choice: bool = False) -> Problem:
        return sample_problem(rng, k, multiple_choice)

    def sample_distinct(self, rng: random.Random, k: int, n: int, exclude: set, multiple_choice: bool = False) -> list[Problem]:
        return sample_distinct(rng, k, n, exclude, multiple_choice)

    def n_distinct(self, k: int) -> int:
        return n_distinct_chains(k)

    def all_problems(self, k: int) -> list[Problem] | None:
        """Every problem of length ``k`` where there are few enough to probe them all (k = 1: 40)."""
        return [Problem(s, (op,)) for s in range(10) for op in OPS] if k == 1 else None

    def parse(self, text: str) -> Problem:
        return parse_chain(text)

    def trajectory(self, problem: Problem, rng: random.Random) -> str:
        """The thinking text of a reasoning trace: the worked steps."""
        return problem.steps

    def attempt(self, problem: Problem) -> str:
        """The answer section of a trace: the bare answer ("Answer: " is added when s1's format is built)."""
        return problem.answer

    def metadata(self, problem: Problem) -> dict:
        return {"k": problem.k, "start": problem.start, "ops": list(problem.ops), "choices": list(problem.choices)}
