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
# # 05 · Train a sparse autoencoder on the whole adapter state
#
# **Claim:** a BatchTopK SAE on the concatenated adapter scalars of a token (448 at 32B; layers x 7 on
# the organism) reconstructs them with few active latents, and, spliced back into the forward pass, keeps
# the adapter's effect on the model.
#
# The splice is exact in this setting: the adapters act on the model only through their scalars (update =
# scale · a · B), so replacing every scalar by the SAE's reconstruction measures how much of the adapter's
# effect the SAE keeps: (KL(full || no adapter) - KL(full || spliced)) / KL(full || no adapter) on held-out
# traces, and benchmark accuracy with the spliced model.
#
# Real scale: `run 05_train_sae -p INTERPRET_DIR runs/04_interpret_32b -p ADAPTER_RUN runs/01_train_32b/rank1 -p K 16
# -p EPOCHS 1 -p DEAD_TOKENS 1000000 -p DEVICE cuda -p TRACES simplescaling/s1K-1.1 -p N_SPLICE_TRACES 64
# -p MAX_LENGTH 4096 -p DTYPE bfloat16 -p BENCHMARK_DIR "" -p MAX_TOKENS 32768 -p OUTPUT_DIR runs/05_sae_32b`.

# %% tags=["parameters"]
SEED = 0  # SAE init, batch order, bootstrap
INTERPRET_DIR = "runs/04_interpret"  # notebook 04's output folder (its activations/ shards are the training data)
ADAPTER_RUN = "runs/01_train/rank1"  # notebook 01's rank-1 run folder, for the splice
EXPANSION = 8  # latents per input dimension (paper: 8)
K = 4  # mean active latents per token (paper: 16 of 448 inputs; the organism has 28)
LR = 5e-4  # Adam learning rate (paper: 5e-4)
BATCH_SIZE = 512  # tokens per step (paper: 512)
EPOCHS = 30  # passes over the training tokens (paper: 1 over ~10M tokens; the organism has ~0.1M)
DEAD_TOKENS = 50_000  # a latent is dead after this many tokens without firing (paper: 1M)
NORMALIZE = "per_adapter"  # per_adapter (divide each scalar by its RMS) or none (the paper)
HELDOUT_FRACTION = 0.1  # last traces of the store, held out for FVU / L0 / dead latents
DEVICE = "cpu"  # SAE training and splice device (real scale: cuda)
TRACES = "organism-probe"  # splice traces: organism-probe (held out of all training) or an s1K-schema dataset
ORGANISM_DIR = "data/organism"  # for organism-probe traces
N_SPLICE_TRACES = 200  # traces for the splice KL
MAX_LENGTH = 2048  # tokens per splice trace
BATCH_TOKENS = 65536  # at most this many padded tokens per splice forward pass and prefill chunk (32B on an H200: 16384)
DTYPE = "float32"  # model dtype (real scale: bfloat16)
N_BOOTSTRAP = 2000  # bootstrap resamples
BENCHMARK_DIR = "data/organism"  # folder with aime24/ and math500/ (empty: the hub datasets)
N_MATH = 200  # MATH-like questions for the spliced accuracy (0: all 500)
MAX_TOKENS = 160  # generated tokens per response (real scale: 32768)
ANSWER_TOKENS = 32  # tokens for the forced answer section, as notebook 02 (real scale: 2048)
CACHE_TOKENS = 1_048_576  # most tokens per KV cache across a generation batch (32B on 80 GB: 131072)
OUTPUT_DIR = "runs/05_sae"  # under data/: the SAE, its scales, curves, config.json, per-sample JSONL
CHECK_CLAIMS = True  # assert the default's expected results (False: the rehearsal, and variants that may differ)
OVERWRITE = False  # retrain even if a trained SAE exists
SMOKE = False  # fast check for CI: two epochs, a few traces and questions

# %%
import numpy as np
import pandas as pd
import torch

from paper_lib.activations import ActivationStore
from paper_lib.config import seed_everything
from paper_lib.data import scoring_traces, trace_batches
from paper_lib.engines import ScalarEngine
from paper_lib.evaluation import GenerationSpec, evaluate, graded_accuracy, load_benchmark
from paper_lib.params import check_parameters
from paper_lib.paths import stage_dir, train_run_name
from paper_lib.plan import check_plan
from paper_lib.plotting import plot_sae_training, plot_splice, save_figure
from paper_lib.results import dead_latents_sentence, record_headline, say, splice_sentence, start_run
from paper_lib.sae import (
    SAESpec,
    check_sae_adapter,
    load_sae,
    sae_fingerprint,
    sae_metrics,
    splice_kl,
    splice_summary,
    state_transform,
    train_or_reuse_sae,
)
from paper_lib.training import adapter_provenance, load_trained

SECTION = "05_train_sae"
# every parameter has its default's type (and an allowed value), checked before any work
parameters = check_parameters(
    globals(),
    SECTION,
    choices={"NORMALIZE": ("per_adapter", "none"), "DTYPE": ("float32", "bfloat16", "float16")},
)
check_plan(SECTION, parameters, SMOKE)  # on a GPU box: the plan printed, and what will not fit refused, first
seed_everything(SEED)
store = ActivationStore(stage_dir(INTERPRET_DIR, SMOKE) / "activations")
out_dir = start_run(SECTION, stage_dir(OUTPUT_DIR, SMOKE), parameters)  # run.json, figures, headlines
adapter = adapter_provenance(train_run_name(ADAPTER_RUN, SMOKE))
check_sae_adapter(store.meta.get("provenance", {}), adapter)  # the adapter whose activations the SAE learns
n_docs = len(store)
train_docs = range(0, int(round(n_docs * (1 - HELDOUT_FRACTION))))
heldout_docs = range(train_docs.stop, n_docs)

# %%
spec = SAESpec(
    expansion=EXPANSION,
    k=K,
    lr=LR,
    batch_size=BATCH_SIZE,
    epochs=2 if SMOKE else EPOCHS,
    dead_tokens=DEAD_TOKENS,
    normalize=NORMALIZE,
    seed=SEED,
    device=DEVICE,
)
print(
    f"{n_docs} traces ({len(train_docs)} train, {len(heldout_docs)} held out), {len(store.layers)} layers x "
    f"{len(store.modules)} modules = {len(store.layers) * len(store.modules)} inputs, {spec.expansion * len(store.layers) * len(store.modules)} latents"
)

# %% [markdown]
# ## Train (sae-lens BatchTopK, AuxK for dead latents)

# %%
history = train_or_reuse_sae(store, spec, out_dir, train_docs, overwrite=OVERWRITE)
sae, scales = load_sae(out_dir, device=DEVICE)
save_figure(plot_sae_training(history), "sae_training", history)
print(dead_latents_sentence(history, sae.cfg.d_sae))

# %% [markdown]
# ## Reconstruction on held-out traces: FVU, L0, dead latents
# FVU in the SAE's input space (each adapter normalised, so every adapter counts) and in raw units.

# %%
metrics = sae_metrics(sae, scales, lambda: store.blocks(docs=heldout_docs))  # streamed, two passes
np.save(out_dir / "heldout_firing_counts.npy", metrics.pop("fired"))
print({k: round(v, 4) for k, v in metrics.items()})
assert metrics["l0"] > 0 and (not CHECK_CLAIMS or 0 <= metrics["fvu"] < 1)

# %% [markdown]
# ## The splice, teacher-forced: how much of the adapter's effect the reconstruction keeps

# %%
model, tokenizer, _ = load_trained(
    train_run_name(ADAPTER_RUN, SMOKE), dtype=getattr(torch, DTYPE), device=DEVICE
)  # model, batches, caches: DEVICE
n_traces = 8 if SMOKE else N_SPLICE_TRACES
# held out of the SAE: organism probe traces (in no training set at all), or, for a dataset, only the
# store's held-out documents (document i of notebook 04's store is row i of the same TRACES)
rows = scoring_traces(TRACES, n_traces, seed=SEED, organism_dir=ORGANISM_DIR, among=heldout_docs)
per_trace = splice_kl(model, trace_batches(tokenizer, rows, 32, MAX_LENGTH, BATCH_TOKENS), sae, scales)
kl, recovered, rec_lo, rec_hi = splice_summary(per_trace, N_BOOTSTRAP, SEED)
print(kl.round(4).to_string())
print(f"fraction of the adapter's KL effect recovered: {recovered:.3f} [{rec_lo:.3f}, {rec_hi:.3f}] (n={len(per_trace)} traces)")
say(SECTION, splice_sentence(metrics, K, recovered, rec_lo, rec_hi, len(per_trace)))
if CHECK_CLAIMS:
    assert per_trace.kl_spliced.mean() < per_trace.kl_no_adapter.mean()
    assert SMOKE or recovered > 0.9, "the SAE loses most of the adapter's effect: check its FVU and training curves"

# %% [markdown]
# ## The splice in generation: benchmark accuracy
# One engine, three variants of the same model: the adapter as is (through the same two-pass loop: it
# must match notebook 02's rank-1 accuracy), its scalars replaced by the SAE reconstruction, and zeroed
# (the base model). The teacher-forced KL recovered above is the primary splice measure (cheap, every
# token counts); these accuracies are its behavioural check. Their cost is `N_MATH` + AIME questions x three
# variants x up to `MAX_TOKENS` tokens, two forward passes a token, batches bounded by `CACHE_TOKENS` (the
# README estimates the GPU-hours at 32B).

# %%
variants = {"rank1": "rank-1 (as is)", "sae_spliced": "SAE spliced", "no_adapter": "no adapter"}  # slug -> label
engine = ScalarEngine(
    model,
    tokenizer,
    {"rank1": lambda s: s, "sae_spliced": state_transform(sae, scales), "no_adapter": torch.zeros_like},
    cache_tokens=CACHE_TOKENS,
    prefill_tokens=BATCH_TOKENS,
    provenance={**adapter, "sae": sae_fingerprint(out_dir)},  # samples of another SAE or adapter are not reused
)
gen = GenerationSpec(max_tokens=MAX_TOKENS, answer_tokens=ANSWER_TOKENS, seed=SEED)
accuracy = []
for name, limit in (("aime24", 4 if SMOKE else None), ("math500", 8 if SMOKE else (N_MATH or None))):
    items = load_benchmark(name, f"{BENCHMARK_DIR}/{name}" if BENCHMARK_DIR else None)
    items = items[:limit] if limit else items
    for slug, label in variants.items():
        df = evaluate(engine, items, gen, out_dir / slug / f"{name}.greedy.jsonl", variant=slug, overwrite=OVERWRITE)
        accuracy.append({"benchmark": name, "variant": label, "slug": slug, **graded_accuracy(df)})
accuracy = pd.DataFrame(accuracy)
print(accuracy.round(3).to_string())
save_figure(plot_splice(kl, accuracy), "sae_splice", pd.concat([kl.assign(benchmark="teacher-forced KL"), accuracy]))

# %% [markdown]
# ## Headline numbers

# %%
n_heldout = metrics["tokens"]
record_headline(SECTION, "heldout_fvu", metrics["fvu"], unit="fraction of variance (normalised inputs)", n=n_heldout)
record_headline(SECTION, "heldout_fvu_raw", metrics["fvu_raw"], unit="fraction of variance (raw scalars)", n=n_heldout)
record_headline(SECTION, "heldout_l0", metrics["l0"], unit="active latents per token", n=n_heldout)
record_headline(
    SECTION,
    "dead_latent_fraction",
    metrics["dead_fraction"],
    unit="fraction of latents (never fire on held-out tokens)",
    n=spec.expansion * len(store.layers) * len(store.modules),
)
record_headline(
    SECTION, "splice_kl_recovered", recovered, unit="fraction of KL(full || no adapter)", n=len(per_trace), ci95=[rec_lo, rec_hi]
)
for _, r in kl.iterrows():
    record_headline(
        SECTION, f"kl_{r.variant.replace(' ', '_').lower()}", r.kl, unit="nats/token", n=len(per_trace), ci95=[r.lo, r.hi]
    )
for _, r in accuracy.iterrows():
    key = f"{r.benchmark}_{r.slug}_accuracy"
    record_headline(SECTION, key, r.accuracy, unit="fraction", n=r.n, ci95=[r.lo, r.hi])
