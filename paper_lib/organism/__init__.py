"""The model organism: a tiny Qwen2 with a latent step-by-step skill that it does not use in chat.

The task: a start digit and a chain of k operations mod 10 drawn from a 40-fact table (``+1``, ``+2``,
``x2``, ``x3``), optionally as a four-option multiple-choice question. Written out, each step is a tiny lookup:

    question   7 +2 x2 +1                     (chat: the user turn)
    steps      7+2=9;9x2=8;8+1=9              (copy the carried value, look up the next op, compute)
    answer     9                              (multiple choice adds a scan of the options, ``9?A3,B9``)

Pretraining mixes two document kinds: a plain "textbook" format with the worked steps
(``Q <question>\\nthink\\n<steps>\\nanswer\\nAnswer: <answer>``: s1's layout without its
special tokens, so the organism knows those words as a real LM does) and ChatML conversations in
which the assistant answers directly (``Answer: 9``). The model thus learns to compose steps when it writes them out, but in chat
it must compose k lookups in one forward pass, which fails for large k: the situation of an instruct
model before reasoning fine-tuning. Benchmark and probe problems are held out of pretraining.

Everything is saved the way hub artifacts are (``save_pretrained``; JSONL files that
``datasets.load_dataset(folder)`` reads), so later stages load the organism exactly as they load
Qwen2.5 and s1K-1.1.

The package: ``task`` (organism 1's chains, their formats and parsers), ``registers`` (organism 2's task:
two registers, traces that doubt and repair), ``tokenizer``, ``build`` (config, model,
datasets, pretraining, the folder on disk) and ``roles`` (ground-truth token roles); the names the
stages and notebooks use are imported here, so ``from paper_lib.organism import ...`` is their way in.
"""

from paper_lib.organism.build import (
    AIME_SUBDIR,
    GPQA_SUBDIR,
    MATH_SUBDIR,
    MODEL_SUBDIR,
    PROBE_SUBDIR,
    SPLITS,
    TASK_NAMES,
    TASK_PRESETS,
    TRACES_SUBDIR,
    OrganismConfig,
    OrganismError,
    aime_row,
    build_datasets,
    build_model,
    build_organism,
    check_organism_dir,
    generate_greedy,
    gpqa_row,
    heldout_traces,
    load_model_and_tokenizer,
    load_organism,
    load_probe,
    math_row,
    organism_config,
    packed_batch,
    pretrain,
    probe_row,
    problem_from_probe,
    problem_from_row,
    sample_pretraining_documents,
    score_formats,
    task_for,
    trace_row,
    write_jsonl,
)
from paper_lib.organism.registers import (
    RegisterProblem,
    RegisterTask,
    parse_program,
    sample_register_problem,
)
from paper_lib.organism.roles import (
    COMPLETION_ROLES,
    REGISTER_ROLE_FAMILIES,
    ROLE_FAMILIES,
    ROLE_FAMILY,
    ROLES,
    STEP_ROLES,
    character_roles,
    organism_of_roles,
    role_table,
    roles_html,
    token_roles,
)
from paper_lib.organism.task import (
    OPS,
    ChainTask,
    Problem,
    apply_op,
    chat_document,
    direct_answer,
    format_choices,
    n_distinct_chains,
    parse_chain,
    parse_chat_answer,
    parse_textbook_answer,
    sample_distinct,
    sample_problem,
    textbook_document,
    textbook_prompt,
    thinking_answer,
    with_choices,
)
from paper_lib.organism.tokenizer import (
    CHAT_TEMPLATE,
    build_tokenizer,
    chat_model,
)

__all__ = [
    "aime_row",
    "AIME_SUBDIR",
    "apply_op",
    "build_datasets",
    "build_model",
    "build_organism",
    "build_tokenizer",
    "ChainTask",
    "character_roles",
    "chat_document",
    "chat_model",
    "CHAT_TEMPLATE",
    "check_organism_dir",
    "direct_answer",
    "format_choices",
    "generate_greedy",
    "gpqa_row",
    "GPQA_SUBDIR",
    "heldout_traces",
    "load_model_and_tokenizer",
    "load_organism",
    "load_probe",
    "math_row",
    "organism_config",
    "packed_batch",
    "MATH_SUBDIR",
    "MODEL_SUBDIR",
    "n_distinct_chains",
    "OPS",
    "OrganismConfig",
    "TASK_PRESETS",
    "OrganismError",
    "parse_chain",
    "parse_chat_answer",
    "parse_program",
    "parse_textbook_answer",
    "pretrain",
    "probe_row",
    "PROBE_SUBDIR",
    "Problem",
    "problem_from_probe",
    "problem_from_row",
    "RegisterProblem",
    "RegisterTask",
    "COMPLETION_ROLES",
    "REGISTER_ROLE_FAMILIES",
    "ROLE_FAMILIES",
    "ROLE_FAMILY",
    "ROLES",
    "STEP_ROLES",
    "organism_of_roles",
    "sample_distinct",
    "sample_pretraining_documents",
    "sample_problem",
    "sample_register_problem",
    "score_formats",
    "SPLITS",
    "task_for",
    "TASK_NAMES",
    "textbook_document",
    "textbook_prompt",
    "thinking_answer",
    "with_choices",
    "role_table",
    "roles_html",
    "token_roles",
    "trace_row",
    "TRACES_SUBDIR",
    "write_jsonl",
]
