"""Answer grading: math-verify for math answers, a small parser for multiple-choice letters.

Only the text after the think section is graded (s1's ``<|im_start|>answer`` section, or what follows a
``</think>``). A response with no extractable answer is wrong, never an exception.

math-verify's own timeout uses ``signal.alarm``, which fails outside the main thread (vLLM, notebooks
and thread pools call from others). We disable it and impose our own: each grading call runs in a
daemon thread that the caller waits on for at most ``timeout_s``; an overrunning call (sympy can hang on
adversarial input) is counted wrong and left to finish in the background. A thread rather than a
worker process, because spawned processes re-import the caller's ``__main__`` (a script without a
``__main__`` guard, a notebook kernel) and forked ones inherit vLLM's and torch's threads mid-state.
"""

from __future__ import annotations

import logging
import re
import threading

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


def is_correct_math(response: str, gold: str, timeout_s: float = DEFAULT_TIMEOUT_S) -> bool:
    """Whether the final answer of ``response`` equals ``gold`` (math-verify); False on no answer or timeout."""
    text = final_section(response)
    if not text or not str(gold).strip():
        return False
    if "\\boxed" in text:  # several boxed answers: the last one counts (math-verify would take the first)
        text = text[text.rindex("\\boxed") :]
    why = pathological(text)
    if why:
        log.warning("not graded (counted wrong): %s", why)
        return False
    result: dict[str, object] = {}

    def work() -> None:
        try:
            result["value"] = _verify(text, str(gold))
        except Exception as err:  # math-verify/sympy errors on odd input count as wrong, never crash a run
            result["error"] = err

    thread = threading.Thread(target=work, daemon=True)
    thread.start()
    thread.join(timeout_s)
    if thread.is_alive():
        log.warning("grading timed out after %.0f s; counted wrong: %r", timeout_s, text[:200])
        return False
    if "error" in result:
        log.warning("grading failed (%s); counted wrong: %r", result["error"], text[:200])
        return False
    return bool(result.get("value", False))


# "Answer: B", "answer is (B)", "\boxed{B}", "**B**", "(B)" and "B." alone on a line, most explicit first.
_CHOICE_PATTERNS = [
    re.compile(r"\\boxed\{\s*\(?([A-D])\)?\s*\}"),
    re.compile(r"(?:final\s+)?answer\s*(?:is|:)?\s*[:\-]?\s*\**\(?([A-D])\)?(?![A-Za-z])", re.IGNORECASE),
    re.compile(r"^\s*\**\(?([A-D])\)?[.:)]?\**\s*$", re.MULTILINE),
    re.compile(r"\(([A-D])\)"),
]


def extract_choice(response: str) -> str | None:
    """The chosen letter A-D in the final section (the last match of the most explicit pattern), or None."""
    text = final_section(response)
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
