# ---
# jupyter:
#   jupytext:
#     formats: py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: paper-lib
#     language: python
#     name: paper-lib
# ---

# %% [markdown]
# # 00 · Build the model organism
#
# **Claim:** a 2M-parameter, 8-layer `Qwen2ForCausalLM`, pretrained in-repo, can run a short program on
# two registers when it writes every state out (textbook format) but not when a chat question asks for
# the answer directly, so it holds a latent step-by-step skill that it does not use in chat: the
# situation of Qwen2.5-32B-Instruct before s1's reasoning fine-tune.
#
# Every later notebook runs on this organism by default, through the same code path it runs on
# Qwen2.5 and s1K-1.1 at real scale: the model and tokenizer load with `from_pretrained`, the traces
# and benchmarks with `datasets.load_dataset`, all by path.

# %% tags=["parameters"]
SEED = 0  # seeds the organism's data, initialisation and pretraining stream
ORGANISM_DIR = "data/organism"  # where the organism lives (relative to the repository root)
OUTPUT_DIR = "runs/00_organism"  # under data/: this run's run.json and figures (the main command: figures/)
REBUILD = False  # retrain from scratch (32 min on 2 CPU cores, measured) even if ORGANISM_DIR exists
PRETRAIN_STEPS = 4000  # pretraining steps when rebuilding
TASK = "registers"  # the organism's task: registers (organism 2: doubt and repair in its traces) or chains (organism 1)
LAYERS = 8  # transformer layers when rebuilding (organism 1: 4)
SMOKE = False  # fast check for CI: small evaluation sets (and a tiny build if REBUILD)

# %%
import random

import pandas as pd
from datasets import load_dataset
from IPython.display import HTML, display

from paper_lib.config import seed_everything
from paper_lib.data import format_s1_text
from paper_lib.organism import (
    AIME_SUBDIR,
    GPQA_SUBDIR,
    MATH_SUBDIR,
    TRACES_SUBDIR,
    Problem,
    RegisterProblem,
    build_organism,
    chat_document,
    check_organism_dir,
    load_organism,
    load_probe,
    organism_config,
    problem_from_row,
    role_table,
    roles_html,
    score_formats,
    task_for,
    textbook_document,
    thinking_answer,
)
from paper_lib.params import check_parameters
from paper_lib.paths import resolve, stage_dir
from paper_lib.plotting import plot_latent_gap, plot_pretraining, save_figure
from paper_lib.results import latent_gap_sentence, record_headline, say, start_run
from paper_lib.statistics import wilson_interval

SECTION = "00_build_model_organism"
# every parameter has its default's type (and an allowed value), checked before any work
parameters = check_parameters(globals(), SECTION, choices={"TASK": ("chains", "registers")})
seed_everything(SEED)
organism_dir = resolve(ORGANISM_DIR)
# this run's run.json, figures and headline section (a smoke run never mixes with a full one)
run_dir = start_run(SECTION, stage_dir(OUTPUT_DIR, SMOKE), parameters)  # run.json, figures, headline section

# %% [markdown]
# ## The task: a program on two registers, written out or answered directly
#
# A problem (organism 2, the default) is two start values, a program of k steps and a question about
# one register: `a7 b3 a+2 bx2 a<b a+1 ?b`. A step applies one of 40 facts mod 10 (`+1`, `+2`, `x2`,
# `x3`) to one register, or copies the other register into it (`a<b`). Written out, every step writes
# both registers (`a+2:a9b3`), so what a digit is (carried over, computed, wrapped past 10, copied) is
# not visible in the token itself. Answered directly, the model must run the whole program in one
# forward pass. Multiple-choice variants scan the options and eliminate them in turn. Pretraining shows
# worked steps only in the plain textbook format; chat turns answer directly. The reasoning traces
# (s1K-1.1's schema) put the steps into s1's think/answer format and add what R1 traces do and the
# textbook never shows: sometimes a step slips, the trace writes "Wait" and repairs it; sometimes it
# re-derives a step and confirms it.
#
# Organism 1 (`-p TASK chains -p LAYERS 4`, built with `REBUILD True` into its own `ORGANISM_DIR`): chains
# of table lookups on one value (`7 +2 x2 +1 x3`), whose traces never doubt; the first default, whose
# roles the surface tokens carry (see the README).

# %%
example = (
    Problem(7, ("+2", "x2", "+1", "x3"), choices=(3, 7, 0, 5))
    if TASK == "chains"
    else RegisterProblem((7, 3), ("a+2", "bx2", "a<b", "a+1"), "b", choices=(3, 6, 0, 5))
)
print("textbook document:\n" + textbook_document(example), end="\n\n")

# %% [markdown]
# ## Build, or load the committed organism

# %%
if REBUILD or not (organism_dir / "config.json").exists():
    smoke = {"steps": 40, "warmup_steps": 4, "eval_every": 20} if SMOKE else {"steps": PRETRAIN_STEPS}
    cfg = organism_config(TASK, seed=SEED, num_hidden_layers=LAYERS, **smoke)  # the task's preset, then these
    build_organism(cfg, organism_dir)
check_organism_dir(organism_dir)
model, tokenizer, cfg = load_organism(organism_dir)
if cfg.task != TASK:
    raise ValueError(
        f"{organism_dir} holds a {cfg.task!r} organism; TASK is {TASK!r} (set REBUILD True, or another ORGANISM_DIR)"
    )
task = task_for(cfg)
n_params = sum(p.numel() for p in model.parameters())
print(f"{type(model).__name__}: {n_params:,} parameters, {cfg.num_hidden_layers} layers, hidden {cfg.hidden_size}")
print("chat document:\n" + chat_document(tokenizer, example))
print("s1-format assistant turn:\n" + thinking_answer(example))
print("a reasoning trace's thinking (organism 2's may slip, wait and repair):\n" + task.trajectory(example, random.Random(1)))
assert type(model).__name__ == "Qwen2ForCausalLM" and cfg.num_hidden_layers >= 4
record_headline(SECTION, "parameters", n_params, unit="parameters")

# %% [markdown]
# ## Pretraining
# Loss over steps, and greedy accuracy on a fixed set of held-out monitor problems (k = 2, 4 and the
# AIME-like k) in both formats. Textbook accuracy climbs; chat accuracy stays low.

# %%
history = pd.read_csv(organism_dir / "pretraining_log.csv")
save_figure(plot_pretraining(history), "organism_pretraining", history)
print(
    f"{len(history)} steps, {history['seconds'].iloc[-1] / 60:.1f} min; final 50-step loss {history['loss'].tail(50).mean():.3f}"
)

# %% [markdown]
# ## The datasets load by path, like their hub counterparts, and are disjoint

# %%
traces = load_dataset(str(organism_dir / TRACES_SUBDIR), split="train")
aime = load_dataset(str(organism_dir / AIME_SUBDIR), split="train")
math500 = load_dataset(str(organism_dir / MATH_SUBDIR), split="test")
gpqa = load_dataset(str(organism_dir / GPQA_SUBDIR), split="train")
sizes = {"s1K-1.1": len(traces), "aime24": len(aime), "math500": len(math500), "gpqa_diamond": len(gpqa)}
print(sizes)
print(traces[0])
trace_chains = {q.split("\n")[0] for q in traces["question"]}
bench_chains = set(aime["problem"]) | {p.split("\n")[0] for p in math500["problem"]} | set(gpqa["Question"])
assert sizes == {"s1K-1.1": 1000, "aime24": 30, "math500": 500, "gpqa_diamond": 198}
assert not trace_chains & bench_chains, "traces overlap the benchmarks"
assert sorted(set(math500["level"])) == [1, 2, 3, 4, 5]

# %% [markdown]
# ## The ground truth of figures 2-3: every token's role
# Each token of a trace has a role, read off the trace's structure (`paper_lib.organism.roles`): what a
# digit is (a start value, a value carried over, one computed by a step, one that wrapped past 10, one a
# slip got wrong), what a mark does (a step's mark, a copy, the "Wait" that starts a repair). Notebooks 04
# and 06 score each feature against these roles; a role family is one of the paper's SAE categories (the
# template is the chat format's own tokens). One trace, coloured by family (a token's role under it), then
# every role with its family and its token count over the first 200 traces.

# %%
texts = [format_s1_text(tokenizer, row) for row in traces.select(range(200))]
display(HTML(roles_html(tokenizer, texts[0])))
roles = pd.DataFrame(role_table(tokenizer, texts))
display(roles.set_index("role"))
assert roles["role"].nunique() >= 20 and (roles["family"] != "other").mean() > 0.8

# %% [markdown]
# ## The latent gap: accuracy by difficulty in both formats
# Greedy decoding on the held-out probe problems (organism 1: k = 1 has only 40 chains; all are probed).

# %%
rng = random.Random(SEED)
probe = load_probe(organism_dir)
if SMOKE:
    probe = [p for k in sorted({p.k for p in probe}) for p in rng.sample([q for q in probe if q.k == k], 8)]
scores = score_formats(model, tokenizer, probe)
by_k = scores.groupby(["format", "k"])["correct"].agg(["sum", "count"]).reset_index()
by_k["accuracy"] = by_k["sum"] / by_k["count"]
by_k[["lo", "hi"]] = [wilson_interval(int(s), int(n)) for s, n in zip(by_k["sum"], by_k["count"])]
by_k = by_k.rename(columns={"count": "n"}).drop(columns="sum")
save_figure(plot_latent_gap(by_k, benchmark_k=cfg.aime_steps), "organism_latent_gap", by_k)
print(by_k.pivot(index="k", columns="format", values="accuracy").round(3))

# %% [markdown]
# ## The gap on the benchmarks (base model, chat format vs textbook format)

# %%
benchmarks = {"aime24": (aime, "aime24"), "math500": (math500, "math500"), "gpqa_diamond": (gpqa, "gpqa_diamond")}
rows = []
for name, (dataset, kind) in benchmarks.items():
    items = [problem_from_row(kind, row, seed=SEED, task=task) for row in dataset]
    if SMOKE:
        items = rng.sample(items, 10)
    s = score_formats(model, tokenizer, items)
    s["benchmark"] = name
    rows.append(s)
bench = pd.concat(rows, ignore_index=True)
summary = bench.groupby(["benchmark", "format"])["correct"].agg(["mean", "sum", "count"]).reset_index()
print(summary)


def accuracy(benchmark: str, fmt: str) -> tuple[float, int]:
    row = summary[(summary.benchmark == benchmark) & (summary.format == fmt)].iloc[0]
    return float(row["mean"]), int(row["count"])


for name in benchmarks:
    for fmt in ("chat", "textbook"):
        acc, n = accuracy(name, fmt)
        record_headline(SECTION, f"{name}_{fmt}_accuracy", acc, unit="fraction", n=n)

# %% [markdown]
# ## Headline: the latent gap at the AIME-like difficulty
# Textbook accuracy is measured on every held-out problem of that difficulty (the AIME-like benchmark,
# MATH level 5 at the same k, and the probe set); chat accuracy on the AIME-like benchmark itself.

# %%
hard = scores[scores.k == cfg.aime_steps]
hard_bench = bench[(bench.benchmark.isin(["aime24", "math500"])) & (bench.k == cfg.aime_steps)]
hard_all = pd.concat([hard, hard_bench])
textbook_hard = hard_all[hard_all.format == "textbook"]["correct"]
chat_hard = hard_all[hard_all.format == "chat"]["correct"]
chat_aime, n_aime = accuracy("aime24", "chat")
record_headline(
    SECTION, "textbook_accuracy_at_aime_k", textbook_hard.mean(), unit="fraction", n=len(textbook_hard), k=cfg.aime_steps
)
record_headline(SECTION, "chat_accuracy_at_aime_k", chat_hard.mean(), unit="fraction", n=len(chat_hard), k=cfg.aime_steps)
record_headline(SECTION, "aime24_chat_accuracy", chat_aime, unit="fraction", n=n_aime)
print(
    f"k={cfg.aime_steps}: textbook {textbook_hard.mean():.3f} (n={len(textbook_hard)}), "
    f"chat {chat_hard.mean():.3f} (n={len(chat_hard)}); AIME-like chat {chat_aime:.3f} (n={n_aime})"
)
say(
    SECTION,
    latent_gap_sentence(cfg.aime_steps, textbook_hard.mean(), len(textbook_hard), chat_hard.mean(), len(chat_hard), chat_aime),
)
if not SMOKE:
    assert textbook_hard.mean() >= 0.85, "the organism lacks the step-by-step skill at the AIME-like difficulty"
    assert chat_aime <= 0.35, "the organism already answers AIME-like questions directly: no latent gap"
