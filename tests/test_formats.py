"""The shared formats are defined once (paper_lib.formats) and every stage uses that definition."""

from pathlib import Path

import paper_lib
from paper_lib import formats


def test_each_format_is_defined_in_one_place():
    sources = {str(p): p.read_text() for p in Path(paper_lib.__file__).parent.rglob("*.py") if p.name != "formats.py"}
    for literal in (
        '"<|im_start|>think"',
        '"<|im_start|>answer"',
        '"ABCD"',
        '("<|im_end|>", "<|endoftext|>")',
        '("q_proj", "k_proj"',
        '("gate_proj", "up_proj"',
        "apply_chat_template([{",
    ):
        assert not [name for name, text in sources.items() if literal in text], literal


def test_the_stages_use_the_shared_definitions():
    from paper_lib import ablation, activations, data, engines, evaluation, grading, training
    from paper_lib.organism import build, task

    assert activations.ADAPTER_MODULES is formats.ADAPTER_MODULES == formats.MLP_MODULES + formats.ATTENTION_MODULES
    assert training.ALL_MODULES is formats.ALL_MODULES and ablation.MLP_MODULES is formats.MLP_MODULES
    assert evaluation.THINK is data.THINK is formats.THINK and task.LETTERS is evaluation.LETTERS is formats.LETTERS
    assert build.chat_prompt is evaluation.chat_prompt is formats.chat_prompt
    assert engines.END_MARKERS is grading.END_MARKERS is formats.END_MARKERS
