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
# # 03 · Ablate adapters: which layers and modules matter
#
# **Claim:** removing single adapters moves the model's next-token distribution unevenly: the paper
# finds later layers and the MLP adapters (gate above all) matter most (figure 1).
#
# Metric: KL(p_full || p_ablated) summed over the vocabulary, averaged over the completion tokens of
# held-out traces, mean and 95% bootstrap interval over traces. Families: (a) leave one layer's
# adapters out, (b) one (layer, module) at a time, (c) all attention vs all MLP adapters.
#
# Real scale (see the README): `run 03_ablate_adapters -p ADAPTER_RUN runs/01_train_32b/rank1
# -p TRACES simplescaling/s1K-1.1 -p N_TRACES 16 -p MAX_LENGTH 2048 -p BATCH_TOKENS 16384 -p DTYPE bfloat16
# -p BENCHMARK_DIR "" -p TENSOR_PARALLEL 4 -p MAX_MODEL_LEN 32768 -p MAX_TOKENS 32768 -p ANSWER_TOKENS 2048
# -p OUTPUT_DIR runs/03_ablate_32b` (s1K-1.1's traces are the training data: no held-out set exists at
# real scale; the organism's probe traces are held out).

# %% tags=["parameters"]
SEED = 0  # trace sampling and bootstrap
ADAPTER_RUN = "runs/01_train/rank1"  # notebook 01's rank-1 run folder (under data/)
TRACES = "organism-probe"  # organism-probe (held-out organism traces), or an s1K-schema dataset path / hub id
ORGANISM_DIR = "data/organism"  # for organism-probe traces
N_TRACES = 100  # traces to score (paper: 16)
MAX_LENGTH = 2048  # tokens per trace (paper: the first 2,048)
BATCH_SIZE = 32  # traces per forward pass
BATCH_TOKENS = 65536  # and at most this many padded tokens per forward pass (real scale: 16384 on an H200 at 32B)
DTYPE = "float32"  # model dtype (real scale: bfloat16)
DEVICE = "auto"  # auto (every GPU, else the CPU), cpu, cuda:0 ...
N_BOOTSTRAP = 2000  # bootstrap resamples
BENCHMARK_DIR = "data/organism"  # behavioural ablation: folder with aime24/ and math500/ (empty: hub datasets)
BACKEND = "vllm"  # vllm (all adapter variants in one engine) or hf
MAX_MODEL_LEN = 512  # vLLM context length (real scale: 32768)
MAX_TOKENS = 160  # generated tokens per response (real scale: 32768)
ANSWER_TOKENS = 32  # tokens for the forced answer section (real scale: 2048)
TENSOR_PARALLEL = 1  # vLLM tensor parallelism for the behavioural part (GPUs per engine)
N_BENCHMARK_QUESTIONS = 0  # behavioural part: questions per benchmark (0: all)
REUSE_FROM = "runs/02_evaluate"  # notebook 02's OUTPUT_DIR: its samples generated exactly alike are reused
CHECK_CLAIMS = True  # assert the default's expected results (False: the rehearsal, and variants that may differ)
OUTPUT_DIR = "runs/03_ablate"  # under data/: adapter variants and per-sample JSONL files
SMOKE = False  # fast check for CI: a few traces

# %%
import pandas as pd
import torch

from paper_lib.ablation import (
    ablation_groups,
    ablation_kl,
    later_layers_margin,
    module_layer_table,
    module_margin,
    save_adapter_subset,
    single_adapter_ratio,
    summarize_kl,
    trace_statistic,
)
from paper_lib.config import seed_everything
from paper_lib.data import scoring_traces, trace_batches
from paper_lib.engines import release_memory
from paper_lib.formats import ATTENTION_MODULES, MLP_MODULES
from paper_lib.params import check_context_room, check_parameters
from paper_lib.paths import artifact_dir, stage_dir, train_run_name
from paper_lib.plan import check_plan
from paper_lib.plotting import plot_adapter_ablations, save_figure
from paper_lib.results import claim_verdict, claims_sentence, record_headline, say, start_run
from paper_lib.training import load_trained

SECTION = "03_ablate_adapters"
# every parameter has its default's type (and an allowed value), checked before any work
parameters = check_parameters(
    globals(),
    SECTION,
    choices={"BACKEND": ("vllm", "hf"), "DTYPE": ("float32", "bfloat16", "float16")},
)
check_plan(SECTION, parameters, SMOKE)  # on a GPU box: the plan printed, and what will not fit refused, first
check_context_room(MAX_MODEL_LEN, ANSWER_TOKENS)  # every response would be cut: refused before any work
seed_everything(SEED)
out_dir = start_run(SECTION, stage_dir(OUTPUT_DIR, SMOKE), parameters)  # run.json, figures, headline section
adapter_run = train_run_name(ADAPTER_RUN, SMOKE)  # smoke pairs with smoke
model, tokenizer, train_cfg = load_trained(adapter_run, dtype=getattr(torch, DTYPE), device=DEVICE)
n_traces = 8 if SMOKE else N_TRACES

# %% [markdown]
# ## Traces, teacher-forced
# The prompt is the chat-formatted question; the completion is s1's assistant turn. Only positions that
# predict completion tokens are scored.

# %%
rows = scoring_traces(TRACES, n_traces, seed=SEED, organism_dir=ORGANISM_DIR)
batches = trace_batches(tokenizer, rows, BATCH_SIZE, MAX_LENGTH, BATCH_TOKENS)
print(tokenizer.decode(batches[0]["input_ids"][0][batches[0]["attention_mask"][0].bool()]))
print(f"{len(rows)} traces, {sum(int(b['score_mask'].sum()) for b in batches)} scored positions")

# %% [markdown]
# ## Ablate

# %%
families = ablation_groups(model)
groups = {name: keys for family in families.values() for name, keys in family.items()}
per_trace = ablation_kl(model, batches, groups)
summary = summarize_kl(per_trace, n_resamples=N_BOOTSTRAP, seed=SEED)
table = module_layer_table(summary)
print(summary.round(4).to_string())
assert (summary["kl"] >= -1e-6).all()

# %% [markdown]
# ## Figure 1

# %%
save_figure(plot_adapter_ablations(summary, table), "adapter_ablations", summary)
print(table.round(4))

# %% [markdown]
# ## Headline numbers
# Per-module KL averages the single-adapter KLs over layers; "mlp_over_attention" compares removing all
# MLP adapters with removing all attention adapters (the paper: ~2.4x, from single-adapter means).

# %%
for _, r in summary.iterrows():
    if r.group.startswith("layer ") or r.group in ("attention", "mlp", "all adapters"):
        key = r.group.replace(" ", "_")
        record_headline(SECTION, f"kl_{key}", r.kl, unit="nats/token", n=r.n, ci95=[r.lo, r.hi])
for module, value in table.mean(axis=1).items():
    record_headline(SECTION, f"kl_single_{module}_mean_over_layers", value, unit="nats/token", n=n_traces)
kinds = summary.set_index("group")["kl"]
if {"mlp", "attention"} <= set(kinds.index):  # an adapter on one kind of module has no ratio to report
    record_headline(SECTION, "mlp_over_attention", kinds["mlp"] / kinds["attention"], unit="ratio", n=n_traces)
    single_mlp = table.loc[[m for m in table.index if m in MLP_MODULES]].to_numpy().mean()
    single_attn = table.loc[[m for m in table.index if m in ATTENTION_MODULES]].to_numpy().mean()
    record_headline(SECTION, "single_adapter_mlp_over_attention", single_mlp / single_attn, unit="ratio", n=n_traces)
    print(
        f"MLP vs attention: all-at-once {kinds['mlp'] / kinds['attention']:.2f}x, single-adapter means "
        f"{single_mlp / single_attn:.2f}x"
    )

# %% [markdown]
# ### The paper's three ablation claims, judged
# Each claim is a statistic of the per-trace KLs with a paired bootstrap interval over traces, judged by the
# one rule: later layers (the late third's mean KL minus the larger other third's), MLP over attention
# (single-adapter means, like the paper's ~2.4x) and the gates (gate_proj's mean minus the largest other
# module's).

# %%
print(f"whole adapter KL {kinds['all adapters']:.3f}; adapted kinds: {sorted(families['kind'])}")
# each claim: a statistic of the per-trace KLs with a paired bootstrap interval over traces, judged by one rule
claims = {"later_layers_margin": (later_layers_margin, 0.0)}  # late third's mean KL minus the larger other third's
if {"mlp", "attention"} <= set(kinds.index):
    claims["single_adapter_mlp_over_attention"] = (single_adapter_ratio, 1.0)  # like with like: the paper's ~2.4x
    claims["gate_proj_margin"] = (module_margin("gate_proj"), 0.0)  # gate's mean KL minus the largest other module's
judged = {}
for key, (statistic, bound) in claims.items():
    value, lo, hi = trace_statistic(per_trace, statistic, N_BOOTSTRAP, SEED)
    judged[key] = (value, lo, hi, claim_verdict(lo, hi, low=bound))
    record_headline(SECTION, f"claim_{key}", value, unit="nats/token or ratio", n=n_traces, ci95=[lo, hi], verdict=judged[key][3])
seen = f"**What we see.** Removing every adapter costs {kinds['all adapters']:.3f} nats/token. " + claims_sentence(
    judged,
    {
        "later_layers_margin": "later layers matter most (late third minus the larger other third, nats/token)",
        "single_adapter_mlp_over_attention": "MLP adapters matter more than attention adapters (single-adapter "
        "means, the paper ~2.4x)",
        "gate_proj_margin": "the MLP gates matter most (gate_proj minus the largest other module, nats/token)",
    },
)
say(SECTION, seen)
if CHECK_CLAIMS:
    assert kinds["all adapters"] >= kinds[[g for g in kinds.index if g.startswith("layer ")]].max() - 1e-6
del model  # the behavioural part starts its own engine
release_memory()

# %% [markdown]
# ## Behavioural counterpart: accuracy with attention-only and MLP-only adapters
# The same adapter with the other kind's B zeroed, served beside the full adapter by one engine
# (greedy, budget forcing, as notebook 02).

# %%
import os  # noqa: E402

from paper_lib.engines import HFEngine, VLLMEngine  # noqa: E402
from paper_lib.evaluation import (  # noqa: E402
    GenerationSpec,
    Task,
    evaluate_tasks,
    graded_accuracy,
    load_benchmark,
    reuse_report,
    reuse_samples,
)

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")  # vLLM's start-up log would flood the notebook
full_adapter = artifact_dir(adapter_run) / "final"
variants = {"rank1": str(full_adapter)}
for kind, keep in (("attention", ATTENTION_MODULES), ("mlp", MLP_MODULES)):
    if kind in families["kind"] and len(families["kind"]) > 1:  # a variant only where it differs from the adapter
        variants[f"{kind}_only"] = str(save_adapter_subset(full_adapter, out_dir / f"{kind}_only", keep))
engine = (
    VLLMEngine(
        train_cfg.model, variants, tensor_parallel_size=TENSOR_PARALLEL, dtype=DTYPE, max_model_len=MAX_MODEL_LEN, seed=SEED
    )
    if BACKEND == "vllm"
    else HFEngine(train_cfg.model, variants, dtype=getattr(torch, DTYPE), max_model_len=MAX_MODEL_LEN)
)

# %% [markdown]
# Each variant on the AIME-like and MATH-like questions, greedy and budget-forced as in notebook 02 (whose
# base and adapter samples are the same generation: reused where their spec, weights and serving settings
# match, checked file by file).

# %%
spec = GenerationSpec(max_tokens=MAX_TOKENS, answer_tokens=ANSWER_TOKENS, seed=SEED)
limit = 4 if SMOKE else (N_BENCHMARK_QUESTIONS or None)
tasks, rows = [], []
for name in ("aime24", "math500"):
    items = load_benchmark(name, f"{BENCHMARK_DIR}/{name}" if BENCHMARK_DIR else None, limit=limit)
    for label in (None, *variants):
        tasks.append(Task(items, spec, out_dir / (label or "base") / f"{name}.greedy.jsonl", variant=label))
        rows.append({"benchmark": name, "adapters": label or "none (base)"})
with engine:  # notebook 02's samples where generated exactly alike; the rest one request set a variant
    reused, why = reuse_samples(engine, tasks, out_dir, stage_dir(REUSE_FROM, SMOKE) if REUSE_FROM else None)
    frames = evaluate_tasks(engine, tasks)
print(reuse_report(REUSE_FROM, reused, why))
behaviour = pd.DataFrame([{**row, **graded_accuracy(df)} for row, df in zip(rows, frames)])
print(behaviour.round(3).to_string())
for _, r in behaviour.iterrows():
    record_headline(
        SECTION, f"{r.benchmark}_{r.adapters.split(' ')[0]}_accuracy", r.accuracy, unit="fraction", n=r.n, ci95=[r.lo, r.hi]
    )
