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
# # 02 · Evaluate reasoning: base vs rank-1 vs full fine-tune
#
# **Claim:** the rank-1 LoRA recovers most of the full fine-tune's gain on the reasoning benchmarks
# (the paper: 73-90% on AIME24, MATH500 and GPQA-Diamond); we measure how much, with intervals.
#
# Protocols: (a) s1's: greedy decoding with budget forcing (open `<|im_start|>think`, stop at the next
# `<|im_start|>` or the thinking budget, force `<|im_start|>answer\nFinal Answer:`); (b) pass@1 over
# n samples at temperature 0.6, top_p 0.95, fixed seeds. The adapter is served **unmerged** by vLLM
# (`enable_lora=True`, `max_lora_rank` read from the adapter), so no bf16 merge rounds the rank-1 update
# away. The base model is measured the way s1 reports Qwen2.5-32B-Instruct, with its own chat protocol
# (no think section; `base_chat`, the headline), and budget-forced beside it (`base`). No request ever
# exceeds `MAX_MODEL_LEN`: a trace that runs out of room is forced to answer, and counted.
#
# Real scale (vLLM on GPUs; the s1.1-32B checkpoint as the full fine-tune):
#
# ```bash
# run 02_evaluate_reasoning -p BASE_MODEL Qwen/Qwen2.5-32B-Instruct -p ADAPTER_RUN runs/01_train_32b/rank1 \
#   -p FULL_MODEL simplescaling/s1.1-32B -p BENCHMARK_DIR "" -p CHOICE_STYLE s1 -p DTYPE bfloat16 \
#   -p TENSOR_PARALLEL 4 -p MAX_MODEL_LEN 32768 -p MAX_TOKENS 32768 -p ANSWER_TOKENS 2048 -p N_SAMPLES 8 \
#   -p OUTPUT_DIR runs/02_evaluate_32b
# ```

# %% tags=["parameters"]
SEED = 0  # sampling seeds and GPQA option order
BASE_MODEL = "data/organism/model"  # base model: path or hub id (real scale: Qwen/Qwen2.5-32B-Instruct)
ADAPTER_RUN = "runs/01_train/rank1"  # notebook 01's rank-1 run folder (under data/); its final/ adapter is served
FULL_RUN = "runs/01_train/full"  # notebook 01's full fine-tune run folder (used when FULL_MODEL is empty)
FULL_MODEL = ""  # or a path / hub id of the full fine-tune (real scale: simplescaling/s1.1-32B)
BENCHMARK_DIR = "data/organism"  # folder with aime24/, math500/, gpqa_diamond/ (empty: the hub datasets)
CHOICE_STYLE = "organism"  # GPQA prompt: organism (one-line options) or s1
BACKEND = "vllm"  # vllm or hf (transformers generate)
TENSOR_PARALLEL = 1  # vLLM tensor parallelism (GPUs per engine)
DTYPE = "float32"  # model dtype for serving (real scale: bfloat16)
MAX_MODEL_LEN = 512  # vLLM context length (real scale: 32768)
MAX_TOKENS = 160  # generated tokens per response (s1: 32768)
THINKING_BUDGET = 0  # budget forcing: max thinking tokens (0: whatever MAX_TOKENS leaves)
ANSWER_TOKENS = 32  # tokens for the forced answer section (real scale: 2048, room for a sentence and a box)
ENFORCE_EAGER = False  # vLLM: True turns CUDA graphs off on GPUs (the CPU backend always runs eagerly)
WAIT_COUNT = 0  # s1's "Wait" extension count
N_SAMPLES = 4  # pass@1 samples per question at temperature 0.6 (0: skip the sampled protocol)
SCALING_BENCHMARK = "aime24"  # s1's test-time scaling sweeps run on this benchmark ("": skip them)
SCALING_BUDGETS = "16,32,64,128"  # thinking budgets to sweep, no "Wait" (real scale: 512,1024,2048,4096,8192)
SCALING_WAITS = "0,1,2,4"  # numbers of "Wait"s to sweep at the greedy protocol's budget (real scale: 0,1,2,4,6)
N_BOOTSTRAP = 2000  # bootstrap resamples for intervals
OUTPUT_DIR = "runs/02_evaluate"  # under data/: per-sample JSONL files per model x benchmark x protocol
REUSE_FROM = ""  # an earlier run's OUTPUT_DIR: its base and full samples are reused where generated exactly alike
OVERWRITE = False  # discard earlier per-sample files instead of resuming them
CHECK_CLAIMS = True  # assert the default's expected results (False: the rehearsal, and variants that may differ)
SMOKE = False  # fast check for CI: a few questions per benchmark, HF backend allowed

# %%
import dataclasses
import os
from pathlib import Path

import pandas as pd
from IPython.display import HTML, display

from paper_lib.config import seed_everything
from paper_lib.evaluation import (
    GenerationSpec,
    evaluate_models,
    load_benchmark,
    pick_question,
    recovery_beside_default,
    responses_side_by_side,
    scaling_curve,
    scaling_specs,
    sweep_changes,
    waits_side_by_side,
)
from paper_lib.params import check_context_room, check_parameters
from paper_lib.paths import artifact_dir, clear_run_dir, stage_dir, train_run_name
from paper_lib.plan import check_plan
from paper_lib.plotting import plot_benchmark_accuracy, plot_test_time_scaling, plot_variant_recovery, save_figure
from paper_lib.results import (
    NO_CLAIM,
    claim_verdict,
    record_headline,
    record_recovery,
    recovery_verdicts,
    say,
    scaling_sentence,
    start_run,
)
from paper_lib.statistics import bootstrap_interval, recovery_table

SECTION = "02_evaluate_reasoning"
# every parameter has its default's type (and an allowed value), checked before any work
parameters = check_parameters(
    globals(),
    SECTION,
    choices={
        "CHOICE_STYLE": ("organism", "s1"),
        "BACKEND": ("vllm", "hf"),
        "DTYPE": ("float32", "bfloat16", "float16"),
        "SCALING_BENCHMARK": ("", "aime24", "math500", "gpqa_diamond"),
    },
)
check_plan(SECTION, parameters, SMOKE)  # on a GPU box: the plan printed, and what will not fit refused, first
check_context_room(MAX_MODEL_LEN, ANSWER_TOKENS)  # every response would be cut: refused before any work
seed_everything(SEED)
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # vLLM inside a notebook kernel
os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")  # vLLM's start-up log would flood the notebook
out_dir = stage_dir(OUTPUT_DIR, SMOKE)  # smoke pairs with smoke: never mixed with a full run
adapter_dir = str(artifact_dir(train_run_name(ADAPTER_RUN, SMOKE)) / "final")
full_model = FULL_MODEL or str(artifact_dir(train_run_name(FULL_RUN, SMOKE)) / "final")

# %% [markdown]
# ## Benchmarks

# %%
limit = 8 if SMOKE else None
sources = {name: (f"{BENCHMARK_DIR}/{name}" if BENCHMARK_DIR else None) for name in ("aime24", "math500", "gpqa_diamond")}
benchmarks = {name: load_benchmark(name, src, seed=SEED, choice_style=CHOICE_STYLE, limit=limit) for name, src in sources.items()}
print({name: len(items) for name, items in benchmarks.items()})
print(benchmarks["gpqa_diamond"][0])

# %% [markdown]
# ## Generate and grade
# One engine serves the base model and the rank-1 adapter (unmerged); a second serves the full
# fine-tune, started only after the first is released. Every graded sample is appended to a JSONL file
# at once, so an interrupted run resumes.

# %%
from paper_lib.engines import HFEngine, VLLMEngine, resolve_model  # noqa: E402
from paper_lib.training import LoraSpec, TrainConfig, check_adapter  # noqa: E402

# every input loaded and checked before anything earlier runs left is discarded
forced = dict(
    max_tokens=MAX_TOKENS, thinking_budget=THINKING_BUDGET or None, wait_count=WAIT_COUNT, answer_tokens=ANSWER_TOKENS, seed=SEED
)
protocols = {"greedy": GenerationSpec(**forced)}
if N_SAMPLES and not SMOKE:
    protocols["sampled"] = GenerationSpec(temperature=0.6, top_p=0.95, n=N_SAMPLES, **forced)
# the base model's own chat protocol: no think section, the whole budget for the reply
chat = {name: dataclasses.replace(spec, budget_forcing=False) for name, spec in protocols.items()}
# s1's test-time scaling: the greedy protocol at other thinking budgets and numbers of "Wait"s (checked here)
scaling = scaling_specs(protocols["greedy"], SCALING_BUDGETS, SCALING_WAITS) if SCALING_BENCHMARK else {}
check_adapter(adapter_dir, BASE_MODEL)
resolve_model(full_model)
if OVERWRITE:
    clear_run_dir(out_dir, SECTION)  # only a run folder this notebook made: never data/, the organism or another run
start_run(SECTION, out_dir, parameters)  # run.json, figures, headline section

# %% [markdown]
# The engines, and what each evaluates: the base model in its own chat protocol and budget-forced, the
# adapter, then the full fine-tune (its engine starts once the first is released).


# %%
def make_engine(model, adapters=None):
    if BACKEND == "vllm":
        return VLLMEngine(
            model,
            adapters,
            tensor_parallel_size=TENSOR_PARALLEL,
            dtype=DTYPE,
            max_model_len=MAX_MODEL_LEN,
            seed=SEED,
            enforce_eager=ENFORCE_EAGER or None,
        )
    return HFEngine(model, adapters, max_model_len=MAX_MODEL_LEN)


# engine (model, adapters) -> what it evaluates: (label, adapter, protocols)
paper_adapter = TrainConfig.load(artifact_dir(train_run_name(ADAPTER_RUN, SMOKE))).lora == LoraSpec()  # its shape: r=1, all
lora = Path(ADAPTER_RUN).name  # the adapter's label: its run folder's name (rank1 for the paper's; rank4, rank1_mlp ...)
if lora in ("base", "base_chat", "full"):
    raise ValueError(f"ADAPTER_RUN {ADAPTER_RUN!r}: a run folder named {lora!r} would mix with the {lora} model's results")
runs = [
    ((BASE_MODEL, {lora: adapter_dir}), [("base_chat", None, chat), ("base", None, protocols), (lora, lora, protocols)]),
    ((full_model, None), [("full", None, protocols)]),
]
reuse = stage_dir(REUSE_FROM, SMOKE) if REUSE_FROM else None
done = evaluate_models(runs, benchmarks, make_engine, out_dir, scaling, SCALING_BENCHMARK, reuse, keep=[lora])
samples, scaled = done.samples, done.scaled
print(done.reuse_report(REUSE_FROM))
print(samples.groupby(["protocol", "benchmark", "model"])["correct"].mean().unstack().round(3))

# %% [markdown]
# ## The models' own words
# One AIME-like question that the rank-1 adapter answers and the base does not (greedy; the first question
# if none), as each model answers it; then what the adapter and the full fine-tune write after one and
# after two forced "Wait"s (the "Wait" sweep below; each continuation starts where the previous response's
# thinking stopped).

# %%
question = pick_question(samples, "aime24", lora, "base")
print(next(it.question for it in benchmarks["aime24"] if it.id == question))
greedy_aime = samples[(samples.protocol == "greedy") & (samples.benchmark == "aime24")]
display(HTML(responses_side_by_side(greedy_aime, question, ["base_chat", "base", lora, "full"])))
if len(scaled) and {"wait0", "wait1", "wait2"} <= set(scaled.setting) and SCALING_BENCHMARK == "aime24":
    display(HTML(waits_side_by_side(scaled, question, [lora, "full"])))

# %% [markdown]
# ## What the context and the answer limit cut
# `thinking_cut`: thinking stopped to leave room for the forced answer within `MAX_MODEL_LEN`;
# `answer_cut`: the answer used all `ANSWER_TOKENS` (it may be cut off before its final answer).

# %%
cuts = (
    samples.groupby(["protocol", "benchmark", "model"])[["thinking_cut", "answer_cut"]]
    .agg(lambda x: int(x.astype(bool).sum()))
    .assign(n=samples.groupby(["protocol", "benchmark", "model"]).size())
)
print(cuts.to_string())

# %% [markdown]
# ## Accuracy with 95% bootstrap intervals
# Per question: greedy correctness, or the mean over the n samples (pass@1). Intervals resample
# questions.

# %%
per_question = samples.groupby(["protocol", "benchmark", "model", "id"])["correct"].mean().reset_index()
rows = []
for (protocol, bench, model), group in per_question.groupby(["protocol", "benchmark", "model"]):
    x = group["correct"].to_numpy(dtype=float)
    lo, hi = bootstrap_interval(x, n_resamples=N_BOOTSTRAP, seed=SEED)
    rows.append({"protocol": protocol, "benchmark": bench, "model": model, "accuracy": x.mean(), "lo": lo, "hi": hi, "n": len(x)})
accuracy = pd.DataFrame(rows)
save_figure(plot_benchmark_accuracy(accuracy), "benchmark_accuracy", accuracy)
print(accuracy.round(3))

# %% [markdown]
# ## Paired differences and what rank-1 recovers
# Same questions for every model, so differences are paired. "Recovered" is reported both ways the
# paper might mean it: (rank1 - base) / (full - base) and rank1 / full, each with a paired bootstrap
# interval (resamples where full = base give no ratio and are dropped).

# %%
recovery = recovery_table(per_question, n_resamples=N_BOOTSTRAP, seed=SEED, models=("base_chat", lora, "full"))
forced_base = recovery_table(per_question, n_resamples=N_BOOTSTRAP, seed=SEED, models=("base", lora, "full"))
save_figure(plot_benchmark_accuracy(accuracy, recovery=recovery), "benchmark_recovery", recovery)
print("base in its own chat protocol (headline):\n", recovery.round(3).to_string())
print("base budget-forced too:\n", forced_base.round(3).to_string())
verdicts, seen = recovery_verdicts(recovery, lora, claimed=paper_adapter)  # the 73-90% claim: the paper's adapter only
say(SECTION, seen)

# %% [markdown]
# ## A variant beside the default
# With `REUSE_FROM` (the default run's folder) and another adapter, the default adapter's gain recovered
# beside this run's: the same questions, the same base and full samples.

# %%
beside = recovery_beside_default(stage_dir(REUSE_FROM, SMOKE), per_question, lora, N_BOOTSTRAP, SEED) if REUSE_FROM else []
if len(beside):
    save_figure(plot_variant_recovery(beside), "benchmark_recovery_beside_default", beside)

# %% [markdown]
# ## s1's test-time scaling: accuracy vs thinking budget and vs "Wait"s
# s1's headline: with budget forcing, accuracy rises with the thinking budget, and suppressing the end of
# thinking with "Wait" lets the model re-check and extend its reasoning. Each point is the greedy protocol
# on the same questions at one setting (budget sweep: no "Wait"; "Wait" sweep: the greedy protocol's
# budget), with a 95% bootstrap interval over questions; the change from no "Wait" to the most is a
# paired difference.

# %%
if len(scaled):
    curve = scaling_curve(scaled, N_BOOTSTRAP, SEED)  # accuracy and its interval at each setting
    save_figure(plot_test_time_scaling(curve), "test_time_scaling", curve)
    print(curve.round(3).to_string())
    # s1's two claims, judged for the adapter: a larger budget, and more "Wait"s, raise accuracy (paired, last - first)
    changes = pd.concat([sweep_changes(scaled, sweep, N_BOOTSTRAP, SEED) for sweep in ("budget", "wait")], ignore_index=True)
    changes["verdict"] = [
        claim_verdict(r.lo, r.hi, low=0.0) if r.model == lora and paper_adapter else NO_CLAIM for r in changes.itertuples()
    ]
    for r in changes.itertuples():
        record_headline(
            SECTION,
            f"scaling_{r.model}_{'waits' if r.sweep == 'wait' else 'budget'}_change",
            r.change,
            unit="accuracy difference",
            n=r.n,
            ci95=[r.lo, r.hi],
            settings=[r.first, r.last],
            **({"verdict": r.verdict} if r.verdict != NO_CLAIM else {}),
        )
    say(SECTION, scaling_sentence(changes, SCALING_BENCHMARK))
    for _, r in curve.iterrows():
        record_headline(
            SECTION, f"scaling_{r.model}_{r.sweep}{r.x}_accuracy", r.accuracy, unit="fraction", n=r.n, ci95=[r.lo, r.hi]
        )

# %% [markdown]
# ## Headline numbers

# %%
for _, r in accuracy.iterrows():
    record_headline(
        SECTION, f"{r.protocol}_{r.benchmark}_{r.model}_accuracy", r.accuracy, unit="fraction", n=r.n, ci95=[r.lo, r.hi]
    )
record_recovery(SECTION, recovery, verdicts)  # gain recovered and ratio to full, the 73-90% verdict beside
record_recovery(SECTION, forced_base, suffix="_vs_forced_base")
for (protocol, bench, model), r in cuts.iterrows():
    for kind in ("thinking_cut", "answer_cut"):
        record_headline(SECTION, f"{protocol}_{bench}_{model}_{kind}", r[kind], unit="responses", n=r.n)
if CHECK_CLAIMS and not SMOKE:
    greedy = accuracy[accuracy.protocol == "greedy"].set_index(["benchmark", "model"])["accuracy"]
    assert greedy.loc[("aime24", lora)] > greedy.loc[("aime24", "base")], "rank-1 SFT did not improve AIME-like accuracy"
