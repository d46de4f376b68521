"""Organism 2's task: two registers, a program of steps on them, a question about one of them.

    question   a7 b3 a+2 bx2 a<b a+1 ?b                      (chat: the user turn)
    steps      a7b3;a+2:a9b3;bx2:a9b6;a<b:a6b6;a+1:a7b6;?b:6  (the step from the question, the new state)
    answer     6

Each arithmetic step is one of the organism's 40 facts (``+1 +2 x2 x3`` mod 10), applied to one register;
a copy ``a<b`` sets a register to the other's value. Every step writes both registers, so what the tokens
do not show is *why* a digit is there: carried unchanged from the state before, computed by a fact
(and whether it wrapped past 10), or copied from the other register; which step of the question comes
next; the final read of the register asked for. Multiple choice scans the options in order and
eliminates each that differs (``6?A3,B6``).

The s1-style traces add what R1 traces do and the textbook never shows: doubt and repair. A trace sometimes
slips on a step (fetches the other register's value), writes ``Wait`` on a new line and re-derives the
step from the right value; sometimes it re-derives a step (or the final read) and confirms it (``ok``).
Budget forcing appends ``Wait`` where thinking ended, so a model fine-tuned on these traces has learnt
what a ``Wait`` asks for: a re-derivation of the last step.
"""

from __future__ import annotations

import dataclasses
import random
import re

from paper_lib.organism.task import OPS, Answered, apply_op, with_choices

REGISTERS = ("a", "b")
COPY = "<"
WAIT_WORD = "Wait"
CONFIRM = "ok"
_OP = re.compile(r"^([ab])(?:([x+][123])|<([ab]))$")


def other(register: str) -> str:
    return REGISTERS[1 - REGISTERS.index(register)]


@dataclasses.dataclass(frozen=True)
class RegisterProblem(Answered):
    """Start values of ``a`` and ``b``, a program of steps (``a+2``, ``bx3``, ``a<b``), the register asked
    for, and, for a multiple-choice variant, the four option values (A-D)."""

    start: tuple[int, int]
    ops: tuple[str, ...]
    target: str
    choices: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if len(self.start) != 2 or not all(0 <= v <= 9 for v in self.start):
            raise ValueError(f"start must be two digits, got {self.start}")
        if self.target not in REGISTERS:
            raise ValueError(f"target must be one of {REGISTERS}, got {self.target!r}")
        for op in self.ops:
            match = _OP.match(op)
            if not match or (match.group(2) and match.group(2) not in OPS) or match.group(3) == match.group(1):
                raise ValueError(f"unknown step {op!r}: a register then one of {OPS}, or <other register")
        self.check_choices()

    @property
    def k(self) -> int:
        return len(self.ops)

    @property
    def completion_room(self) -> int:
        """Tokens a greedy completion gets when scored: both registers a step, and room to doubt and repair."""
        return 3 * len(self.steps) + 40

    @property
    def key(self) -> tuple:
        """Identity of the underlying program (a multiple-choice variant shares it)."""
        return (self.start, self.ops, self.target)

    def states(self) -> list[dict[str, int]]:
        """The registers before the first step and after each."""
        state = dict(zip(REGISTERS, self.start))
        out = [dict(state)]
        for op in self.ops:
            register = op[0]
            state[register] = state[op[2]] if op[1] == COPY else apply_op(state[register], op[1:])
            out.append(dict(state))
        return out

    @property
    def value(self) -> int:
        return self.states()[-1][self.target]

    @property
    def chain(self) -> str:
        return " ".join([f"a{self.start[0]}", f"b{self.start[1]}", *self.ops, f"?{self.target}"])

    def step_texts(self) -> list[str]:
        """The start state, then each step written out: the step as the question writes it, then the
        registers after it (``a+2:a9b3``)."""
        states = self.states()
        return [state_text(states[0]), *(f"{op}:{state_text(after)}" for op, after in zip(self.ops, states[1:]))]

    def read_text(self) -> str:
        return f"?{self.target}:{self.value}"

    @property
    def steps(self) -> str:
        """The clean worked steps (the textbook's): every step, the final read, the option scan."""
        parts = [*self.step_texts(), self.read_text()]
        if self.choices:
            parts.append(self.scan_text())
        return ";".join(parts)

    def trace_steps(self, rng: random.Random, slip: float = 0.3, check: float = 0.3) -> str:
        """The steps as an s1 trace writes them: with probability ``slip`` one arithmetic step is first
        written wrong (the fact applied to the other register's value), then ``Wait`` on a new line and
        the step re-derived; with probability ``check`` one step or the final read is re-derived and
        confirmed (``ok``)."""
        parts = self.step_texts() + [self.read_text()]
        states = self.states()
        arithmetic = [i for i, op in enumerate(self.ops) if op[1] != COPY]
        if arithmetic and rng.random() < slip:
            i = rng.choice(arithmetic)
            op, before = self.ops[i], states[i]
            wrong_input = before[other(op[0])]
            if wrong_input == before[op[0]]:
                wrong_input = (wrong_input + rng.choice((1, 9))) % 10
            wrong = dict(states[i + 1])
            wrong[op[0]] = apply_op(wrong_input, op[1:])
            if wrong == states[i + 1]:  # the slip lands on the right value: shift it
                wrong[op[0]] = (wrong[op[0]] + 1) % 10
            parts[i + 1] = f"{op}:{state_text(wrong)}\n{WAIT_WORD} {parts[i + 1]}\n"
        if rng.random() < check:
            i = rng.randrange(1, len(parts))
            if "\n" not in parts[i]:  # not the repaired step
                parts[i] = f"{parts[i]}\n{WAIT_WORD} {parts[i]} {CONFIRM}\n"
        text = ";".join(parts).replace("\n;", "\n")
        if self.choices:
            text += ("" if text.endswith("\n") else ";") + self.scan_text()
        return text.rstrip("\n")


def state_text(state: dict[str, int]) -> str:
    return "".join(f"{r}{state[r]}" for r in REGISTERS)


def sample_register_problem(rng: random.Random, k: int, multiple_choice: bool = False, copy: float = 0.15) -> RegisterProblem:
    """``k`` steps, each on a uniformly drawn register: a copy with probability ``copy``, else a fact."""
    ops = []
    for _ in range(k):
        register = rng.choice(REGISTERS)
        ops.append(f"{register}{COPY}{other(register)}" if rng.random() < copy else register + rng.choice(OPS))
    problem = RegisterProblem((rng.randrange(10), rng.randrange(10)), tuple(ops), rng.choice(REGISTERS))
    return with_choices(rng, problem) if multiple_choice else problem


def parse_program(text: str) -> RegisterProblem:
    """The problem written as ``a7 b3 a+2 bx2 ?b`` (the first line of a question)."""
    parts = text.split("\n")[0].split()
    try:
        if not (parts[0].startswith("a") and parts[1].startswith("b") and parts[-1].startswith("?")):
            raise ValueError
        return RegisterProblem((int(parts[0][1:]), int(parts[1][1:])), tuple(parts[2:-1]), parts[-1][1:])
    except (IndexError, ValueError) as err:
        raise ValueError(f"not a register program: {text!r}") from err


def n_distinct_programs(k: int, copy: bool = True) -> int:
    per_step = 2 * (len(OPS) + (1 if copy else 0))
    return 100 * per_step**k * 2


def sample_distinct_programs(
    rng: random.Random, k: int, n: int, exclude: set, multiple_choice: bool = False
) -> list[RegisterProblem]:
    """``n`` problems with distinct programs of ``k`` steps, none in ``exclude`` (which is updated)."""
    out: list[RegisterProblem] = []
    tries = 0
    while len(out) < n:
        tries += 1
        if tries > 100 * n + 1000:
            raise ValueError(f"could not draw {n} unused programs of {k} steps")
        problem = sample_register_problem(rng, k, multiple_choice)
        if problem.key not in exclude:
            exclude.add(problem.key)
            out.append(problem)
    return out


@dataclasses.dataclass(frozen=True)
class RegisterTask:
    """Organism 2 as the builder sees it (the methods of ``task.ChainTask``); ``slip`` and ``check``: how often
    a reasoning trace slips and repairs, and checks and confirms."""

    slip: float = 0.3
    check: float = 0.3
    name: str = "registers"

    def sample(self, rng: random.Random, k: int, multiple_choice: bool = False) -> RegisterProblem:
        return sample_register_problem(rng, k, multiple_choice)

    def sample_distinct(self, rng: random.Random, k: int, n: int, exclude: set, multiple_choice: bool = False) -> list:
        return sample_distinct_programs(rng, k, n, exclude, multiple_choice)

    def n_distinct(self, k: int) -> int:
        return n_distinct_programs(k)

    def all_problems(self, k: int) -> None:
        return None  # even one step has 2,000 programs: probes are sampled

    def parse(self, text: str) -> RegisterProblem:
        return parse_program(text)

    def trajectory(self, problem: RegisterProblem, rng: random.Random) -> str:
        return problem.trace_steps(rng, self.slip, self.check)

    def attempt(self, problem: RegisterProblem) -> str:
        """The answer section of a trace, as R1's attempts end: with a final answer. s1's budget forcing writes
        ``Final Answer:`` into the answer section; a model that has only ever seen ``Answer: x`` there copied
        the wrong digit after it (measured on this organism: the full fine-tune's think section right on
        30 of 30 AIME-like questions, its forced answer on 14)."""
        return f"Final Answer: {problem.answer}"

    def metadata(self, problem: RegisterProblem) -> dict:
        return {
            "k": problem.k,
            "start": list(problem.start),
            "ops": list(problem.ops),
            "target": problem.target,
            "choices": list(problem.choices),
        }
