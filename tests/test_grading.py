import json

import pytest

from paper_lib.grading import extract_choice, final_section, is_correct_choice, is_correct_math
from paper_lib.paths import REPO_ROOT

SHARED = REPO_ROOT.parent / "shared" / "benchmarks"


def test_final_section_drops_the_think_section():
    r = "<|im_start|>think\nmaybe \\boxed{3}\n<|im_start|>answer\nAnswer: \\boxed{4}<|im_end|>"
    assert final_section(r) == "Answer: \\boxed{4}"
    assert final_section("<think>\\boxed{1}</think> so \\boxed{2}") == "so \\boxed{2}"
    assert final_section("plain 5") == "plain 5"


def test_math_grading_right_wrong_and_no_answer():
    assert is_correct_math("Answer: \\boxed{\\frac{1}{2}}", "\\frac12")
    assert is_correct_math("Answer: 0.5", "\\frac{1}{2}")
    assert not is_correct_math("Answer: \\boxed{3}", "4")
    assert not is_correct_math("I do not know.", "4")
    assert not is_correct_math("", "4")
    assert not is_correct_math("<|im_start|>think\n\\boxed{4}\n<|im_start|>answer\n", "4")  # think text is not graded


def test_math_grading_takes_the_last_boxed_answer():
    assert is_correct_math("First \\boxed{3}, corrected: \\boxed{4}", "4")
    assert not is_correct_math("First \\boxed{4}, corrected: \\boxed{3}", "4")


def test_organism_answers_grade_like_benchmark_answers():
    assert is_correct_math("<|im_start|>think\n1+2=3\n<|im_start|>answer\nAnswer: 3<|im_end|>", "3")
    assert not is_correct_math("<|im_start|>think\n1+2=3\n<|im_start|>answer\nAnswer: 7<|im_end|>", "3")


@pytest.mark.parametrize(
    "response, letter",
    [
        ("Answer: B", "B"),
        ("The answer is (C).", "C"),
        ("\\boxed{D}", "D"),
        ("**A**", "A"),
        ("So the final answer is: b", "B"),
        ("I pick (A) over (B), final answer (B)", "B"),
        ("<|im_start|>think\nAnswer: A\n<|im_start|>answer\nAnswer: D<|im_end|>", "D"),
        ("B.", "B"),
        ("Answer: 9?A3,B9", None),
    ],
)
def test_choice_extraction_in_the_usual_phrasings(response, letter):
    assert extract_choice(response) == letter


def test_choice_grading():
    assert is_correct_choice("Answer: (B)", "B") and not is_correct_choice("Answer: (B)", "C")
    assert not is_correct_choice("no idea", "A")
    with pytest.raises(ValueError):
        is_correct_choice("A", "E")


@pytest.mark.skipif(not (SHARED / "math500.jsonl").is_file(), reason="../shared/benchmarks/math500.jsonl is absent")
def test_every_math500_gold_solution_grades_correct():
    rows = [json.loads(line) for line in (SHARED / "math500.jsonl").read_text().splitlines()]
    wrong = [r["unique_id"] for r in rows if not is_correct_math(r["solution"], r["answer"])]
    assert len(rows) == 500 and wrong == []


@pytest.mark.skipif(not (SHARED / "aime24.jsonl").is_file(), reason="../shared/benchmarks/aime24.jsonl is absent")
def test_every_aime24_answer_grades_correct_as_a_boxed_integer():
    rows = [json.loads(line) for line in (SHARED / "aime24.jsonl").read_text().splitlines()]
    assert len(rows) == 30 and any(r["answer"].startswith("0") for r in rows)
    wrong = [r["answer"] for r in rows if not is_correct_math(f"Answer: \\boxed{{{int(r['answer'])}}}", r["answer"])]
    assert wrong == []
    assert not is_correct_math("\\boxed{26}", "025")


PATHOLOGICAL = [
    "\\boxed{9^{(9)^{9}}}",
    "\\boxed{2^{{2}^{100}}}",
    "\\boxed{(99!)!}",
    "\\boxed{9^{9}!}",
    "\\boxed{10^{10}!}",
    "\\boxed{99!!}",
    "\\boxed{\\binom{10^9}{10^5}}",
]


def test_pathological_answers_are_cut_off_and_leave_nothing_computing():
    """Each answer that sympy would compute for seconds or for ever is counted wrong within its limit, and
    the child grading it is killed: ordinary gradings afterwards run at their usual speed (a thread left
    computing used to slow them 600-fold)."""
    import time

    from paper_lib.grading import WORKER

    for answer in PATHOLOGICAL:
        start = time.perf_counter()
        assert not is_correct_math(f"Answer: {answer}", "5", timeout_s=1.0)
        assert time.perf_counter() - start < 8, answer  # the limit, plus a fresh worker's start after a kill
    start = time.perf_counter()
    assert all(is_correct_math(f"Answer: \\boxed{{{n}}}", str(n)) for n in range(10))
    assert time.perf_counter() - start < 10  # includes one worker start
    assert WORKER.process is not None and WORKER.process.poll() is None


def test_grading_works_off_the_main_thread_and_reads_full_width_digits():
    import threading

    out = []
    thread = threading.Thread(target=lambda: out.append(is_correct_math("Answer: \\boxed{4}", "4")))
    thread.start()
    thread.join()
    assert out == [True]  # math-verify's signal-based timeout would raise outside the main thread
    assert is_correct_math("Answer: \\boxed{\uff15}", "5") and is_correct_math("Answer: \uff11\uff12", "12")
    assert extract_choice("Answer: \uff22") == "B"
