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
# # 01 · Train the rank-1 LoRA and the full fine-tune
#
# **Claim:** one code path (TRL `SFTTrainer` + PEFT) trains both sides of the paper's comparison on
# the same reasoning traces: a rank-1 rsLoRA on all seven projections of every layer, and the
# full-parameter fine-tune it is measured against.
#
# Defaults run on the model organism in minutes on 2 CPU cores. Real scale is the same notebook with
# parameters only, e.g. the paper's run (8 GPUs, FSDP):
#
# ```bash
# jupytext --to ipynb -o - notebooks/01_train_rank1_lora.py | papermill - build/01.ipynb -k paper-lib \
#   -p MODEL Qwen/Qwen2.5-32B-Instruct -p DATASET simplescaling/s1K-1.1 -p OUTPUT_DIR runs/01_train_32b \
#   -p LORA_LR 1e-3 -p FULL_LR 1e-5 -p EPOCHS 5 -p PER_DEVICE_BATCH 1 -p MAX_LENGTH 20000 -p BF16 True \
#   -p GRADIENT_CHECKPOINTING True -p TRAIN_FULL False \
#   -p NUM_PROCESSES 8 -p ACCELERATE_CONFIG paper_lib/accelerate_configs/fsdp_8gpu.yaml
# ```
# (see the README for one-GPU variants and resuming).

# %% tags=["parameters"]
SEED = 42  # seeds data order, initialisation of the adapters, and dropout (none here)
MODEL = "data/organism/model"  # base model: path or hub id (real scale: Qwen/Qwen2.5-32B-Instruct)
DATASET = "data/organism/s1K-1.1"  # traces in s1K-1.1's schema: path or hub id (simplescaling/s1K-1.1)
OUTPUT_DIR = "runs/01_train"  # under data/ (or $PAPER_DATA_DIR): rank1/ (named after the adapter) and full/ go here
LORA_RANK = 1  # the paper's rank
LORA_MODULES = "all"  # all, attention or mlp
LORA_LAYERS = "all"  # all; early, middle or late (a third of the layers); start:end[:stride]; or i,j,k
LORA_LR = 1e-3  # paper: 1e-3
FULL_LR = 1e-3  # s1.1 used 1e-5 at 32B; organism: lowest final loss of {3e-5, 1e-4, 3e-4, 1e-3}
TRAIN_FULL = True  # also train the full fine-tune comparator
EPOCHS = 5.0  # paper: 5
GLOBAL_BATCH = 16  # paper: 16 (per-device batch x accumulation x processes, exactly)
PER_DEVICE_BATCH = 16  # paper: 1 (20k-token sequences); the organism's traces are ~100 tokens
MAX_LENGTH = 512  # paper: 20000 tokens
BF16 = False  # paper: True (GPU)
GRADIENT_CHECKPOINTING = False  # paper: True (non-reentrant); pointless for a 2M-parameter model
USE_LIGER = False  # Liger kernels (GPU only): fused cross-entropy, RMSNorm, SwiGLU, RoPE
NUM_PROCESSES = 1  # >1: launched through accelerate (FSDP config below)
ACCELERATE_CONFIG = ""  # e.g. paper_lib/accelerate_configs/fsdp_8gpu.yaml
DEVICE = "auto"  # after-training checks: auto (every GPU, else the CPU), cpu, cuda:0 ...
MERGE_CHECK_TEXTS = 8  # traces for the merge check
MERGE_CHECK_TOKENS = 512  # each truncated to this many tokens (at 32B the check runs beside the model on the GPU)
HELDOUT = "auto"  # held-out loss traces: auto (the organism's probe; none for s1K-1.1), a dataset, or ""
N_HELDOUT = 100  # held-out traces scored (teacher-forced, completion tokens only)
RESUME = False  # continue an interrupted run from its last checkpoint
OVERWRITE = False  # retrain even if a finished run exists in OUTPUT_DIR
SMOKE = False  # fast check for CI: a few optimizer steps

# %%
from pathlib import Path

import pandas as pd
import torch
from transformers import AutoConfig, AutoTokenizer

from paper_lib.config import seed_everything
from paper_lib.data import format_s1_text, load_traces, scoring_traces, trace_batches
from paper_lib.engines import release_memory
from paper_lib.params import check_parameters
from paper_lib.paths import artifact_dir, resolve, run_name
from paper_lib.plan import check_plan
from paper_lib.plotting import plot_training_losses, save_figure
from paper_lib.results import record_headline, say, start_run, training_sentence
from paper_lib.run_notebooks import next_command
from paper_lib.training import (
    TrainConfig,
    completion_loss,
    count_lora_parameters,
    launch_training,
    layer_subset,
    load_trained,
    lora_run_label,
    lora_spec_for,
    merge_error,
)

SECTION = "01_train_rank1_lora"
# every parameter has its default's type (and an allowed value), checked before any work
parameters = check_parameters(globals(), SECTION, choices={"LORA_MODULES": ("all", "attention", "mlp")})
check_plan(SECTION, parameters, SMOKE)  # on a GPU box: the plan printed, and what will not fit refused, first
organism = Path(DATASET).parent  # held out of training: the probe traces of the organism whose traces train it
is_organism = (resolve(organism) / "config.json").is_file()
heldout = HELDOUT if HELDOUT != "auto" else ("organism-probe" if is_organism else "")
if heldout == "organism-probe" and not is_organism:
    raise ValueError(f'HELDOUT organism-probe: DATASET {DATASET!r} is not an organism\'s traces; give a dataset or ""')
seed_everything(SEED)
out_name = run_name(OUTPUT_DIR, SMOKE)  # a smoke run never clashes with (or reuses) a full one
start_run(SECTION, artifact_dir(out_name), parameters)  # run.json, figures, headline section

# %% [markdown]
# The two runs' settings: the same data, schedule and batch; the adapter's shape from the parameters (its
# run folder is named after it), the full fine-tune's learning rate its own.

# %%
epochs = 0.05 if SMOKE else EPOCHS
common = dict(
    model=MODEL,
    dataset=DATASET,
    epochs=epochs,
    global_batch_size=GLOBAL_BATCH,
    per_device_batch_size=PER_DEVICE_BATCH,
    max_length=MAX_LENGTH,
    bf16=BF16,
    gradient_checkpointing=GRADIENT_CHECKPOINTING,
    use_liger_kernel=USE_LIGER,
    seed=SEED,
    resume=RESUME,
)
num_layers = AutoConfig.from_pretrained(MODEL).num_hidden_layers
lora_spec = lora_spec_for(LORA_MODULES, r=LORA_RANK, **layer_subset(LORA_LAYERS, num_layers))
label = lora_run_label(lora_spec, LORA_MODULES)  # rank1 for the paper's adapter; e.g. rank4, rank1_mlp, rank1_L8-11
lora_cfg = TrainConfig(output_dir=f"{out_name}/{label}", lora=lora_spec, learning_rate=LORA_LR, **common)
full_cfg = TrainConfig(output_dir=f"{out_name}/full", lora=None, learning_rate=FULL_LR, **common)

# %% [markdown]
# ## The training text: s1's format through the model's chat template
# Loss is on the assistant completion only (TRL's prompt-completion format).

# %%
traces = load_traces(DATASET)
print(format_s1_text(AutoTokenizer.from_pretrained(MODEL), traces[0]))
print(f"{len(traces)} traces")

# %% [markdown]
# ## Rank-1 LoRA

# %%
lora_stats = launch_training(lora_cfg, NUM_PROCESSES, ACCELERATE_CONFIG or None, overwrite=OVERWRITE)
# The checks run on the accelerator in the training dtype: no fp32 copy of a 32B model on the host.
lora_model, tokenizer, _ = load_trained(lora_cfg.output_dir, dtype=torch.bfloat16 if BF16 else torch.float32, device=DEVICE)
lora_B = [p for n, p in lora_model.named_parameters() if "lora_B" in n]
expected = count_lora_parameters(lora_cfg.lora, lora_model.get_base_model().config)
print({k: lora_stats[k] for k in ("trainable_parameters", "optimizer_steps", "final_loss", "tokens_per_second")})
assert lora_stats["trainable_parameters"] == expected, "trainable parameters differ from r*(d_in+d_out) per adapter"
assert all(b.abs().sum() > 0 for b in lora_B), "some lora_B is still zero: no gradient reached it"

# %% [markdown]
# ## Full fine-tune (the comparator)

# %%
full_stats = launch_training(full_cfg, NUM_PROCESSES, ACCELERATE_CONFIG or None, overwrite=OVERWRITE) if TRAIN_FULL else None
if full_stats:
    print({k: full_stats[k] for k in ("trainable_parameters", "optimizer_steps", "final_loss", "tokens_per_second")})

# %% [markdown]
# ## Loss curves

# %%
histories = []
for name, cfg in ((f"LoRA ({label})", lora_cfg), ("full fine-tune", full_cfg)):
    path = artifact_dir(cfg.output_dir) / "log_history.csv"
    if path.is_file():
        h = pd.read_csv(path)
        histories.append(h[h["loss"].notna()][["step", "epoch", "loss"]].assign(run=name))
losses = pd.concat(histories, ignore_index=True)
save_figure(plot_training_losses(losses), "training_loss", losses)

# %% [markdown]
# ## Held-out loss
# The training loss above is on the traces trained on; here the same loss (nats per completion token,
# teacher-forced) on `N_HELDOUT` traces no model was trained on (`HELDOUT`), for the base model (adapter
# off), the rank-1 adapter and the full fine-tune. A rank-1 adapter that only memorised its traces would
# gain little here.

# %%
print(f"held-out traces: {heldout or 'none (HELDOUT names a dataset in s1K-1.1 schema to score one)'}")
if heldout:
    rows = scoring_traces(heldout, 8 if SMOKE else N_HELDOUT, seed=SEED, organism_dir=str(organism))
    batches = trace_batches(tokenizer, rows, 16, MERGE_CHECK_TOKENS)
    scored = {label: completion_loss(lora_model, batches)}
    with lora_model.disable_adapter():
        scored["base"] = completion_loss(lora_model, batches)
    if full_stats:
        full_model, _, _ = load_trained(full_cfg.output_dir, dtype=torch.bfloat16 if BF16 else torch.float32, device=DEVICE)
        scored["full"] = completion_loss(full_model, batches)
        del full_model
    losses_heldout = pd.DataFrame([{"model": m, "heldout_loss": loss, "tokens": n} for m, (loss, n) in scored.items()])
    print(losses_heldout.round(4).to_string(index=False))
    for _, r in losses_heldout.iterrows():
        record_headline(SECTION, f"heldout_loss_{r.model}", r.heldout_loss, unit="nats/token", n=int(r.tokens))
    assert scored[label][0] < scored["base"][0], "the adapter does not lower the held-out loss below the base model's"

# %% [markdown]
# ## Merging: fp32 is exact, bf16 is not
# The authors merged the adapter into the base in bf16 before serving it with vLLM. A rank-1 update is
# small next to the weights it is added to, and bf16 rounds part of it away. We measure each merge
# against the unmerged model: logit errors (absolute, and relative to the largest logit: an exact merge
# in fp32 still differs by float32 accumulation order), probability errors, and for bf16 the share of
# each update B·A that rounding loses. The check runs where the model is, in its dtype, one projection's
# merged weight at a time (no copy of the model), on a few truncated traces.

# %%
merge_texts = [format_s1_text(tokenizer, traces[i]) for i in range(min(MERGE_CHECK_TEXTS, len(traces)))]
errors = merge_error(lora_model, tokenizer, merge_texts, max_length=MERGE_CHECK_TOKENS)
print(errors)
if not BF16:  # fp32 model: the exact merge differs only by float32 accumulation order
    assert errors["fp32_max_rel_logit_error"] <= 1e-5
    assert errors["bf16_max_abs_prob_error"] > errors["fp32_max_abs_prob_error"]
assert errors["bf16_update_fraction_lost"] > 0

# %% [markdown]
# ## Headline numbers

# %%
for name, stats in ((label, lora_stats), ("full", full_stats)):
    if not stats:
        continue
    for key, unit in (
        ("final_loss", "nats/token"),
        ("trainable_parameters", "parameters"),
        ("tokens_per_second", "tok/s"),
        ("train_seconds", "s"),
        ("optimizer_steps", "steps"),
    ):
        record_headline(SECTION, f"{name}_{key}", stats[key], unit=unit)
for key, value in errors.items():
    record_headline(
        SECTION,
        f"merge_{key}",
        value,
        unit="fraction" if "fraction" in key or "rel" in key else ("probability" if "prob" in key else "logit"),
        n=len(merge_texts),
    )
say(SECTION, training_sentence(label, lora_stats, full_stats, errors))
print(f"the adapter: {lora_cfg.output_dir}; next: {next_command(lora_cfg.output_dir, OUTPUT_DIR)}")
del lora_model
release_memory()
if full_stats and not SMOKE:
    assert lora_stats["final_loss"] < 2 * full_stats["final_loss"] + 0.5, "rank-1 loss far above the full fine-tune's"
