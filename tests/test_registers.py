"""Organism 2's task: two registers, back-references, wraps, and traces that doubt and repair."""

import random

import pytest

from paper_lib.organism.registers import (
    CONFIRM,
    WAIT_WORD,
    RegisterProblem,
    n_distinct_programs,
    parse_program,
    sample_distinct_programs,
    sample_register_problem,
)


def test_a_program_runs_and_writes_every_state():
    p = parse_program("a7 b3 a+2 bx2 a<b a+1 ?b")
    assert p.start == (7, 3) and p.ops == ("a+2", "bx2", "a<b", "a+1") and p.target == "b"
    assert [s["a"] for s in p.states()] == [7, 9, 9, 6, 7] and p.value == 6 and p.answer == "6"
    assert p.steps == "a7b3;a+2:a9b3;bx2:a9b6;a<b:a6b6;a+1:a7b6;?b:6"
    mc = RegisterProblem((7, 3), p.ops, "b", choices=(3, 6, 0, 5))
    assert mc.answer == "B" and mc.steps.endswith(";?b:6;6?A3,B6") and "(B) 6" in mc.question
    assert parse_program(mc.question).key == p.key


@pytest.mark.parametrize("bad", ["a7 b3 a+5 ?a", "a7 b3 a<a ?a", "a7 b3 c+1 ?a", "a7 b3 a+1 ?c", "7 3 a+1 ?a", "a7 b3 a+1"])
def test_malformed_programs_are_refused_with_the_text(bad):
    with pytest.raises(ValueError, match="register program|unknown step|target"):
        parse_program(bad)


def test_traces_slip_then_repair_and_check_then_confirm():
    rng = random.Random(0)
    seen_slip = seen_check = 0
    for _ in range(300):
        p = sample_register_problem(rng, rng.randint(2, 8), multiple_choice=rng.random() < 0.2)
        trace = p.trace_steps(rng, slip=0.5, check=0.5)
        clean = p.steps.split(";")
        lines = trace.split("\n")
        for i, line in enumerate(lines):
            if not line.startswith(WAIT_WORD + " "):
                continue
            rederived = line[len(WAIT_WORD) + 1 :].removesuffix(" " + CONFIRM)
            assert rederived in clean  # what follows "Wait" is always the right step (or the final read)
            before = lines[i - 1].split(";")[-1]
            if line.endswith(CONFIRM):
                seen_check += 1
                assert before == rederived  # a check repeats a right step and confirms it
            else:
                seen_slip += 1
                assert before != rederived and before.split(":")[0] == rederived.split(":")[0]  # same step, wrong state
        # each repair replaces the step before it, each check repeats it: applied, the trace is the clean steps
        kept = []
        for line in lines:
            if line.startswith(WAIT_WORD + " "):
                if not line.endswith(CONFIRM):
                    kept[-1] = line[len(WAIT_WORD) + 1 :]
                continue
            kept += [x for x in line.split(";") if x]
        assert kept == clean
    assert seen_slip > 50 and seen_check > 50
    assert p.trace_steps(rng, slip=0, check=0) == p.steps


def test_distinct_programs_are_distinct_and_exclusions_hold():
    rng = random.Random(3)
    held: set = set()
    first = sample_distinct_programs(rng, 4, 200, held)
    second = sample_distinct_programs(rng, 4, 200, held, multiple_choice=True)
    keys = [p.key for p in first + second]
    assert len(set(keys)) == 400 and set(keys) == held
    assert n_distinct_programs(1) == 100 * 10 * 2


def test_roles_of_a_register_trace_say_why_each_digit_is_there():
    from paper_lib.judge import PAPER_CATEGORIES
    from paper_lib.organism import ROLE_FAMILY, ROLES, build_tokenizer, character_roles, thinking_answer
    from paper_lib.organism.roles import REGISTER_ROLE_FAMILIES

    tok = build_tokenizer()
    p = parse_program("a7 b3 a+2 bx2 a<b a+1 ?b")
    thinking = "a7b3;a+2:a9b3;bx2:a9b9\nWait bx2:a9b6\na<b:a6b6;a+1:a7b6\nWait a+1:a7b6 ok\n?b:6"
    assert thinking.replace("\nWait bx2:a9b6\n", "X").replace("\nWait a+1:a7b6 ok\n", ";") != p.steps  # a real slip
    answer = thinking_answer(p).split("\n", 1)[1].split(p.steps)[1]  # the answer section after the steps
    text = tok.apply_chat_template([{"role": "user", "content": p.question}], tokenize=False, add_generation_prompt=True)
    text += "<|im_start|>think\n" + thinking + answer + "<|im_end|>"
    roles = character_roles(text)
    at = {i: r for i, r in enumerate(roles)}
    think = text.index("think\n") + 6

    def role(fragment, offset, nth=0):
        start = think
        for _ in range(nth + 1):
            start = text.index(fragment, start) + 1
        return at[start - 1 + offset]

    assert role("a7b3", 1) == role("a7b3", 3) == "start_value"
    assert role("a+2:a9b3", 5) == "computed_value" and role("a+2:a9b3", 7) == "carried_value"
    assert role("bx2:a9b9", 7) == "erroneous_value"  # the slip: the next line repairs it
    assert at[text.index("\nWait bx2")] == "before_wait" and role("Wait", 0) == "wait_word"
    assert role("Wait bx2:a9b6", 12) == "computed_value"  # the repair computes 3x2 from the state before the slip
    assert role("a<b:a6b6", 5) == "copied_value" and role("a<b:a6b6", 1) == "copy_mark"
    assert role("a+1:a7b6 ok", 9) == "confirm_word"
    assert role("?b:6", 3) == "final_read_value" and role("?b:6", 0) == "read_mark"
    assert role("Answer: 6", 8) == "answer_value"
    # wraps: 9 + 2 = 11 -> 1
    wrapped = character_roles(text.replace("a7 b3", "a9 b3").replace("a7b3;a+2:a9b3", "a9b3;a+2:a1b3"))
    assert wrapped[text.index("a+2:a9b3", think) + 5] == "wrapped_value"
    # every role is known and sits in one of the paper's seven categories (or the template)
    assert set(roles) <= set(ROLES)
    assert set(REGISTER_ROLE_FAMILIES) == set(PAPER_CATEGORIES)
    assert {ROLE_FAMILY[r] for r in roles} <= set(PAPER_CATEGORIES) | {"template", "other"}
    # the same digit token plays many roles: token identity does not give the role away
    digit_roles = {r for c, r in zip(text[think:], roles[think:]) if c == "6"}
    assert len(digit_roles) >= 4


def test_an_organism_builds_from_the_registers_task_and_reads_back_with_it(tmp_path):
    """The same builder and loading path: a tiny organism 2 writes its datasets in the hub schemas, its
    traces doubt and repair, and its probe, held-out traces and benchmark rows read back as register
    problems (the task is named in its config.json)."""
    from datasets import load_dataset

    from paper_lib.organism import (
        AIME_SUBDIR,
        GPQA_SUBDIR,
        TRACES_SUBDIR,
        OrganismConfig,
        build_organism,
        heldout_traces,
        load_organism,
        load_probe,
        problem_from_row,
        task_for,
    )

    cfg = OrganismConfig(
        task="registers", steps=6, warmup_steps=1, eval_every=3, batch_size=4, hidden_size=32, intermediate_size=64,
        num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, n_traces=40, n_aime=8, n_gpqa=8,
        n_probe_per_k=4, math_level_counts=(2, 2, 2, 2, 2), max_position_embeddings=512,
    )  # fmt: skip
    build_organism(cfg, tmp_path, threads=1)
    assert load_organism(tmp_path)[2] == cfg
    probe = load_probe(tmp_path)
    assert probe and all(isinstance(p, RegisterProblem) for p in probe)
    traces = load_dataset(str(tmp_path / TRACES_SUBDIR), split="train")
    assert any(WAIT_WORD in t for t in traces["deepseek_thinking_trajectory"])
    assert set(traces["source_type"]) <= {"organism/register", "organism/register_mc"}
    held = heldout_traces(tmp_path, 5)
    assert len(held) == 5 and all(parse_program(r["question"]).answer == r["deepseek_attempt"].split()[-1] for r in held)
    task = task_for(cfg)
    aime = load_dataset(str(tmp_path / AIME_SUBDIR), split="train")
    assert all(problem_from_row(AIME_SUBDIR, r, task=task).answer == r["answer"] for r in aime)
    for row in load_dataset(str(tmp_path / GPQA_SUBDIR), split="train"):
        p = problem_from_row(GPQA_SUBDIR, row, task=task)
        assert str(p.choices[ord(p.answer) - 65]) == row["Correct Answer"]
    with pytest.raises(Exception, match="task: must be one of"):
        OrganismConfig(task="queues")


def test_the_two_organisms_roles_are_named_apart():
    """One role, one family: a name shared by both organisms would move organism 1's role into organism 2's
    category (and change organism 1's scores)."""
    from paper_lib.organism.roles import REGISTER_ROLE_FAMILIES, ROLE_FAMILIES, ROLE_FAMILY

    first = {r for roles in ROLE_FAMILIES.values() for r in roles}
    second = {r for roles in REGISTER_ROLE_FAMILIES.values() for r in roles}
    assert not first & second
    assert all(ROLE_FAMILY[r] == f for f, roles in ROLE_FAMILIES.items() for r in roles)


def test_notebook_00_builds_each_task_from_its_preset():
    """Organism 2 is built deeper and from packed rows (its preset); parameters override the preset; an
    unknown task is refused by name."""
    from paper_lib.organism import OrganismConfig, organism_config

    cfg = organism_config("registers", seed=1)
    assert cfg.task == "registers" and cfg.num_hidden_layers == 8 and cfg.pack_length > 0 and cfg.seed == 1
    assert organism_config("registers", num_hidden_layers=10).num_hidden_layers == 10
    assert organism_config("chains") == OrganismConfig()
    with pytest.raises(ValueError, match="unknown task 'queues'"):
        organism_config("queues")
