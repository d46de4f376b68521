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
# Real scale: `run 03_ablate_adapters -p BASE_MODEL Qwen/Qwen2.5-32B-Instruct -p ADAPTER_RUN runs/01_train_32b/rank1
# -p TRACES simplescaling/s1K-1.1 -p N_TRACES 64 -p MAX_LENGTH 2048 -p DTYPE bfloat16` (s1K-1.1's traces are
# the training data: no held-out set exists at real scale; the organism's probe traces are held out).

# %% tags=["parameters"]
SEED = 0  # trace sampling and bootstrap
ADAPTER_RUN = "runs/01_train/rank1"  # notebook 01's rank-1 run folder (under data/)
TRACES = "organism-probe"  # organism-probe (held-out organism traces), or an s1K-schema dataset path / hub id
ORGANISM_DIR = "data/organism"  # for organism-probe traces
N_TRACES = 200  # traces to score (paper: 16)
MAX_LENGTH = 2048  # tokens per trace (paper: the first 2,048)
BATCH_SIZE = 32  # traces per forward pass
DTYPE = "float32"  # model dtype (real scale: bfloat16)
N_BOOTSTRAP = 2000  # bootstrap resamples
SMOKE = False  # fast check for CI: a few traces

# %%
import torch

from paper_lib.ablation import ablation_groups, ablation_kl, completion_batches, module_layer_table, summarize_kl
from paper_lib.config import seed_everything
from paper_lib.data import load_traces, s1_assistant_turn
from paper_lib.organism import heldout_traces
from paper_lib.paths import resolve
from paper_lib.plotting import plot_adapter_ablations, save_figure
from paper_lib.results import record_headline
from paper_lib.training import load_trained

SECTION = "03_ablate_adapters"
seed_everything(SEED)
model, tokenizer, train_cfg = load_trained(ADAPTER_RUN, dtype=getattr(torch, DTYPE))
n_traces = 8 if SMOKE else N_TRACES

# %% [markdown]
# ## Traces, teacher-forced
# The prompt is the chat-formatted question; the completion is s1's assistant turn. Only positions that
# predict completion tokens are scored.

# %%
if TRACES == "organism-probe":
    rows = heldout_traces(resolve(ORGANISM_DIR), n_traces, seed=SEED)
else:
    rows = list(load_traces(TRACES).shuffle(seed=SEED).select(range(n_traces)))
prompts = [tokenizer.apply_chat_template([{"role": "user", "content": r["question"]}], tokenize=False,
                                         add_generation_prompt=True) for r in rows]
completions = [s1_assistant_turn(r["deepseek_thinking_trajectory"], r["deepseek_attempt"]) + "<|im_end|>" for r in rows]
batches = completion_batches(tokenizer, prompts, completions, BATCH_SIZE, MAX_LENGTH)
print(prompts[0] + completions[0])
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
record_headline(SECTION, "mlp_over_attention", kinds["mlp"] / kinds["attention"], unit="ratio", n=n_traces)
single_mlp = table.loc[[m for m in table.index if m in ("gate_proj", "up_proj", "down_proj")]].to_numpy().mean()
single_attn = table.loc[[m for m in table.index if m in ("q_proj", "k_proj", "v_proj", "o_proj")]].to_numpy().mean()
record_headline(SECTION, "single_adapter_mlp_over_attention", single_mlp / single_attn, unit="ratio", n=n_traces)
print(f"MLP vs attention: all-at-once {kinds['mlp'] / kinds['attention']:.2f}x, single-adapter means "
      f"{single_mlp / single_attn:.2f}x; whole adapter KL {kinds['all adapters']:.3f}")
assert kinds["all adapters"] >= kinds[[g for g in kinds.index if g.startswith("layer ")]].max() - 1e-6
