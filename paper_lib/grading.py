"""Answer grading: math-verify for math answers, a small parser for multiple-choice letters.

Only the text after the think section is graded (s1's ``<|im_start|>answer`` section, or what follows a
``</think>``). A response with no extractable answer is wrong, never an exception.

math-verify's own timeout uses ``signal.alarm``, which fails outside the main thread (vLLM, notebooks
and thread pools call from others), and a thread cannot be stopped once sympy is inside an exact power
or factorial. So every grading runs in one child process (``python -m paper_lib.grading --worker``, a
fresh interpreter: nothing of the caller's ``__main__``, vLLM's or torch's threads is inherited, as
multiprocessing's spawn and fork would) that the caller waits on for at most ``timeout_s``; one that
overruns is counted wrong and the child is killed and replaced, so nothing keeps computing. Answers and
gold are NFKC-normalised first (a full-width ``５`` is a 5).
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import re
import select
import subprocess
import sys
import threading
import unicodedata

from paper_lib.formats import ANSWER, END_MARKERS, LETTERS

log = logging.getLogger(__name__)
# math-verify warns once that its timeout is off; ours (below) replaces it.
for _name in ("math_verify.parser", "math_verify.grader"):
    logging.getLogger(_name).setLevel(logging.ERROR)

ANSWER_MARKERS = (ANSWER, "</think>")  # s1's answer section, or what follows a closed think block
DEFAULT_TIMEOUT_S = 10.0


def final_section(response: str) -> str:
    """The part of a response that is graded: after the last think/answer marker, before end markers."""
    text = response
    for marker in ANSWER_MARKERS:
        if marker in text:
            text = text.rsplit(marker, 1)[1]
            break
    for marker in END_MARKERS:
        text = text.split(marker, 1)[0]
    return text.strip()


def _verify(response_text: str, gold: str) -> bool:
    """math-verify in the worker: gold parsed as LaTeX/expression, the response's last answer extracted."""
    from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify

    gold_parsed = parse(f"${gold}$", extraction_config=[LatexExtractionConfig(), ExprExtractionConfig()], parsing_timeout=None)
    if not gold_parsed:
        gold_parsed = parse(gold, parsing_timeout=None)
    answer = parse(
        response_text,
        extraction_config=[LatexExtractionConfig(boxed_match_priority=0), ExprExtractionConfig()],
        parsing_timeout=None,
    )
    if not gold_parsed or not answer:
        return False
    return bool(verify(gold_parsed, answer, timeout_seconds=None))


# Expressions sympy would evaluate for ever (it computes exact powers and factorials): a power whose
# exponent holds another power (9^{9^{9}}), an exponent of 4+ digits, a factorial of 3+ digits. A
# thread cannot be stopped once sympy is inside such a computation, so these are refused before it starts.
_NUMERIC_POWER = r"\d\s*\^\s*[{(]?\s*\d"  # 9^9, 9^{9}, 9^(9)
_PATHOLOGICAL = (
    re.compile(r"\^\s*\{[^{}]*" + _NUMERIC_POWER),
    re.compile(r"\^\s*\([^()]*" + _NUMERIC_POWER),
    re.compile(r"\d\s*\^\s*\d+\s*\^\s*[{(]?\s*\d"),
    re.compile(r"\^\s*[{(]?\s*\d{4,}"),
    re.compile(r"\d{3,}\s*!"),
    re.compile(r"\d\s*\*\*\s*\(?\s*\d+\s*\*\*"),
)
MAX_ANSWER_CHARS = 20_000  # a whole answer section of 2,048 tokens is ~8k characters


def pathological(text: str) -> str | None:
    """Why grading ``text`` could run without end (None: it cannot)."""
    if len(text) > MAX_ANSWER_CHARS:
        return f"an answer of {len(text)} characters"
    for pattern in _PATHOLOGICAL:
        match = pattern.search(text)
        if match:
            return f"a tower of powers or a huge exponent or factorial ({match.group(0)[:40]!r})"
    return None


class GradingWorker:
    """One child process that grades with math-verify, fed one JSON line a request; a request that overruns
    its limit kills the child (a fresh one starts on the next request), so no hung sympy keeps a core."""

    START_TIMEOUT_S = 120.0  # importing math-verify and sympy, once per child

    def __init__(self) -> None:
        self.process: subprocess.Popen | None = None
        self.lock = threading.Lock()  # one request at a time: callers in several threads take turns

    def _start(self) -> subprocess.Popen:
        from paper_lib.paths import REPO_ROOT

        process = subprocess.Popen(
            [sys.executable, "-m", "paper_lib.grading", "--worker"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            cwd=REPO_ROOT,
            text=True,
            bufsize=1,
            env={**os.environ, "OMP_NUM_THREADS": "1"},
        )
        if self._read(process, self.START_TIMEOUT_S) != "ready":
            self._kill(process)
            raise RuntimeError("the grading worker did not start (python -m paper_lib.grading --worker)")
        return process

    @staticmethod
    def _read(process: subprocess.Popen, timeout_s: float) -> str | None:
        ready, _, _ = select.select([process.stdout], [], [], timeout_s)
        return process.stdout.readline().strip() if ready else None

    @staticmethod
    def _kill(process: subprocess.Popen) -> None:
        process.kill()
        process.wait()

    def grade(self, text: str, gold: str, timeout_s: float) -> bool | str:
        """True/False, or why it could not be graded (a timeout, an error): counted wrong by the caller."""
        with self.lock:
            if self.process is None or self.process.poll() is not None:
                self.process = self._start()
            try:
                self.process.stdin.write(json.dumps([text, gold]) + "\n")
                self.process.stdin.flush()
            except BrokenPipeError:
                self.process = None
                return "the grading worker died"
            line = self._read(self.process, timeout_s)
            if line is None or not line:
                self._kill(self.process)
                self.process = None
                return f"timed out after {timeout_s:.0f} s (worker killed)" if line is None else "the grading worker died"
            reply = json.loads(line)
            return reply["value"] if "value" in reply else reply["error"]

    def close(self) -> None:
        with self.lock:
            if self.process is not None and self.process.poll() is None:
                self._kill(self.process)
            self.process = None


WORKER = GradingWorker()
atexit.register(WORKER.close)


def serve() -> None:
    """The worker's loop: a JSON ``[text, gold]`` a line in, ``{"value": bool}`` or ``{"error": ...}`` out.
    math-verify's own output goes to stderr, so stdout carries only replies."""
    out = os.fdopen(os.dup(sys.stdout.fileno()), "w", buffering=1)
    sys.stdout = sys.stderr
    import math_verify  # noqa: F401  (imported before "ready": the caller's limit is for grading alone)

    out.write("ready\n")
    for line in sys.stdin:
        text, gold = json.loads(line)
        try:
            out.write(json.dumps({"value": _verify(text, gold)}) + "\n")
        except Exception as err:  # math-verify/sympy errors on odd input count as wrong
            out.write(json.dumps({"error": f"{type(err).__name__}: {err}"[:300]}) + "\n")


def is_correct_math(response: str, gold: str, timeout_s: float = DEFAULT_TIMEOUT_S) -> bool:
    """Whether the final answer of ``response`` equals ``gold`` (math-verify, in the grading worker); False
    on no answer, an error or a timeout (the worker is then killed)."""
    text = unicodedata.normalize("NFKC", final_section(response))
    gold = unicodedata.normalize("NFKC", str(gold))
    if not text or not gold.strip():
        return False
    if "\\boxed" in text:  # several boxed answers: the last one counts (math-verify would take the first)
        text = text[text.rindex("\\boxed") :]
    why = pathological(text)
    if why:
        log.warning("not graded (counted wrong): %s", why)
        return False
    result = WORKER.grade(text, gold, timeout_s)
    if not isinstance(result, bool):
        log.warning("grading %s; counted wrong: %r", result, text[:200])
        return False
    return result


# "Answer: B", "answer is (B)", "\boxed{B}", "**B**", "(B)" and "B." alone on a line, most explicit first.
_CHOICE_PATTERNS = [
    re.compile(r"\\boxed\{\s*\(?([A-D])\)?\s*\}"),
    re.compile(r"(?:final\s+)?answer\s*(?:is|:)?\s*[:\-]?\s*\**\(?([A-D])\)?(?![A-Za-z])", re.IGNORECASE),
    re.compile(r"^\s*\**\(?([A-D])\)?[.:)]?\**\s*$", re.MULTILINE),
    re.compile(r"\(([A-D])\)"),
]


def extract_choice(response: str) -> str | None:
    """The chosen letter A-D in the final section (the last match of the most explicit pattern), or None."""
    text = unicodedata.normalize("NFKC", final_section(response))
    for pattern in _CHOICE_PATTERNS:
        matches = pattern.findall(text)
        if matches:
            return matches[-1].upper()
    return None


def is_correct_choice(response: str, gold_letter: str) -> bool:
    """Whether the response's chosen letter is ``gold_letter`` (no letter: wrong)."""
    if gold_letter.upper() not in LETTERS or len(gold_letter) != 1:
        raise ValueError(f"gold_letter must be one of A-D, got {gold_letter!r}")
    return extract_choice(response) == gold_letter.upper()


if __name__ == "__main__" and sys.argv[1:] == ["--worker"]:
    serve()
