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
# # 04 · Interpret LoRA activations: are the adapter scalars as interpretable as MLP neurons?
#
# **Claim:** each adapter's scalar activation `a = A·x` is about as interpretable as an MLP neuron and
# fires on reasoning-specific tokens (the paper's figure 2: LoRA 16% / 40% / 44% monosemantic / broad /
# polysemantic vs MLP neurons 13% / 27% / 60%).
#
# One protocol for three populations, each read both ways (positive and negative polarity): the adapter
# scalars, as many randomly sampled MLP neurons (act(gate)·up, the down_proj input), and as many random
# directions in the adapters' own input spaces (the control: what any linear read-out of the same
# activations scores). On the organism every token's role is known, so a feature is scored by how pure
# its top-k tokens are (precision@k of the best role) and how well it detects that role (AUROC). At real
# scale the LLM judge (explanation, then detection) plays that part; it runs here too when `JUDGE_URL` is
# set.
#
# Real scale: `run 04_interpret_lora_activations -p ADAPTER_RUN runs/01_train_32b/rank1 -p TRACES simplescaling/s1K-1.1
# -p MAX_LENGTH 20000 -p BATCH_SIZE 1 -p DTYPE bfloat16 -p ROLE_SCORER False -p JUDGE_URL http://127.0.0.1:8000/v1
# -p JUDGE_MODEL Qwen/Qwen2.5-72B-Instruct -p OUTPUT_DIR runs/04_interpret_32b`; on several GPUs, extract first with
# `accelerate launch -m paper_lib.activations --adapter-run ... --traces ... --out runs/04_interpret_32b/activations`.

# %% tags=["parameters"]
SEED = 0  # neuron / direction sampling, bootstrap, judge examples
ADAPTER_RUN = "runs/01_train/rank1"  # notebook 01's rank-1 run folder (under data/)
TRACES = "data/organism/s1K-1.1"  # traces in s1K-1.1's schema: path or hub id (the paper: all 1,000 s1K-1.1 traces)
N_TRACES = 1000  # traces to extract (0: all)
MAX_LENGTH = 2048  # tokens per trace (real scale: 20000)
BATCH_SIZE = 32  # traces per forward pass
DTYPE = "float32"  # model dtype (real scale: bfloat16)
MERGED = False  # extraction: fold B·A into W (fastest; exact in float32 only) instead of the unmerged arithmetic
TOP_K = 50  # top tokens per feature and polarity (paper: 50)
CONTEXT = 12  # tokens of context each side on the HTML page (paper: 30)
PAGE_EXAMPLES = 10  # examples per feature on the HTML page
ROLE_SCORER = True  # score against the organism's token roles (organism traces only)
MONO = 0.9  # monosemantic: the best role holds >= MONO of the top-k tokens
BROAD = 0.9  # broad: the best role family holds >= BROAD of the top-k tokens
N_BOOTSTRAP = 2000  # bootstrap resamples
JUDGE_URL = ""  # OpenAI-compatible endpoint for the LLM scorer, e.g. http://127.0.0.1:8000/v1 (empty: skip)
JUDGE_MODEL = ""  # the judge's model name at that endpoint
JUDGE_KEY_ENV = "OPENAI_API_KEY"  # environment variable holding the judge's API key
JUDGE_MAX_TOKENS = 48  # answer tokens per request (0: not sent; reasoning models need thousands)
JUDGE_TOKEN_PARAM = "max_tokens"  # or max_completion_tokens (APIs whose reasoning models refuse max_tokens)
JUDGE_TEMPERATURE = 0.0  # sampling temperature (-1: not sent, for models that refuse one)
JUDGE_CONCURRENCY = 8  # judge requests in flight at once
N_JUDGE_FEATURES = 40  # features per population sent to the judge (0: all)
OUTPUT_DIR = "runs/04_interpret"  # under data/: activation shards, scores, judge cache
OVERWRITE = False  # redo the extraction even if its shards exist
SMOKE = False  # fast check for CI: a few traces

# %%
import shutil
import time

import numpy as np
import pandas as pd
import torch

from paper_lib.activations import (
    build_readout_model,
    extract_activation_shards,
    extract_projections,
    mlp_neuron_directions,
    random_directions,
    sample_mlp_neurons,
)
from paper_lib.config import seed_everything
from paper_lib.judge import JudgeConfig
from paper_lib.params import check_parameters
from paper_lib.data import format_s1_text, load_traces
from paper_lib.interp import class_shares, compare_populations, score_populations, signed_features, top_examples
from paper_lib.organism import ROLE_FAMILY, token_roles
from paper_lib.paths import artifact_dir
from paper_lib.plotting import feature_page_html, plot_interpretability, save_figure, save_html
from paper_lib.results import record_headline, start_run
from paper_lib.training import adapter_provenance, load_trained

SECTION = "04_interpret_lora_activations"
# every parameter has its default's type (and an allowed value), checked before any work
parameters = check_parameters(globals(), SECTION, choices={"DTYPE": ("float32", "bfloat16", "float16")})
seed_everything(SEED)
judge_config = JudgeConfig(  # checked now, not after the expensive work
    JUDGE_URL, JUDGE_MODEL, api_key_env=JUDGE_KEY_ENV, max_tokens=JUDGE_MAX_TOKENS or None, token_param=JUDGE_TOKEN_PARAM,
    temperature=None if JUDGE_TEMPERATURE < 0 else JUDGE_TEMPERATURE, concurrency=JUDGE_CONCURRENCY) if JUDGE_URL else None
out_dir = artifact_dir(OUTPUT_DIR + ("_smoke" if SMOKE else ""))  # a smoke run never clashes with a full one
peft_model, tokenizer, train_cfg = load_trained(ADAPTER_RUN, dtype=getattr(torch, DTYPE))
if torch.cuda.is_available():
    peft_model.cuda()
model = build_readout_model(peft_model, merged=MERGED)  # consumes the PEFT model: no copy at 32B
traces = load_traces(TRACES)
n_traces = 40 if SMOKE else (N_TRACES or len(traces))
texts = [format_s1_text(tokenizer, row) for row in traces.select(range(min(n_traces, len(traces))))]
print(f"{len(texts)} traces; adapters read from the extra output of each projection (merged={MERGED})")

# %% [markdown]
# ## Extract the adapter scalars of every token
# Shards of whole traces (float16), resumable; `run.json` beside them records this notebook's
# parameters.

# %%
store_dir = out_dir / "activations"
if OVERWRITE and store_dir.exists():
    shutil.rmtree(store_dir)
start_run(SECTION, out_dir, parameters)  # run.json (notebook 06 reads its TRACES), figures, headlines
start = time.perf_counter()
store = extract_activation_shards(model, tokenizer, texts, store_dir, batch_size=BATCH_SIZE, max_length=MAX_LENGTH,
                                  provenance=adapter_provenance(ADAPTER_RUN))
seconds = time.perf_counter() - start
token_ids, doc_ids = store.tokens(), store.document_ids()
lora = store.activations().reshape(len(token_ids), -1)  # the store's dtype (float16): all populations alike
lora_names = [f"L{layer}.{module}" for layer in store.layers for module in store.modules]
print(f"{len(token_ids):,} tokens x {lora.shape[1]} adapters in {seconds:.1f} s ({len(token_ids) / seconds:,.0f} tok/s, "
      "0 if the shards existed)")
assert np.isfinite(lora).all() and lora.shape[1] == len(store.layers) * len(store.modules)

# %% [markdown]
# ## The three populations, both polarities
# As many MLP neurons and random directions as there are adapters; all read on the same fine-tuned model
# over the same tokens.

# %%
keys = [(layer, module) for layer in store.layers for module in store.modules]
neurons = sample_mlp_neurons(model, len(keys), seed=SEED)
mlp_directions = mlp_neuron_directions(model, neurons)  # down_proj input coordinates, grouped by layer
mlp_names = [f"L{layer}.n{i}" for layer, _ in mlp_directions for l, i in neurons if l == layer]
directions = random_directions(model, keys, seed=SEED)
mlp = extract_projections(model, tokenizer, texts, mlp_directions, BATCH_SIZE, MAX_LENGTH, dtype=store.meta["dtype"])
rand = extract_projections(model, tokenizer, texts, directions, BATCH_SIZE, MAX_LENGTH, dtype=store.meta["dtype"])
assert mlp.shape == rand.shape == lora.shape and mlp.dtype == rand.dtype == lora.dtype
populations = {"LoRA": signed_features(lora, lora_names), "MLP neuron": signed_features(mlp, mlp_names),
               "random direction": signed_features(rand, [f"L{k[0]}.{k[1]}.rand" for k in keys])}
print({name: values.shape for name, (values, _) in populations.items()})

# %% [markdown]
# ## Top examples of every adapter, per polarity (offline HTML page)

# %%
vocab = {i: tokenizer.decode([i]) for i in np.unique(token_ids).tolist()}
lora_values, lora_signed = populations["LoRA"]
features = top_examples(lora_values, lora_signed, token_ids, doc_ids, vocab.__getitem__, k=PAGE_EXAMPLES, width=CONTEXT)
centre = features[0]["examples"][0]
print(features[0]["name"], repr("".join(centre["tokens"])), centre["value"])
assert all(len(f["examples"]) <= PAGE_EXAMPLES for f in features)

# %% [markdown]
# ## Score every feature against the organism's token roles

# %%
if ROLE_SCORER:
    roles = np.concatenate([token_roles(tokenizer, t, MAX_LENGTH) for t in texts])
    assert len(roles) == len(token_ids)
    scored = score_populations(populations, roles, ROLE_FAMILY, k=TOP_K, mono=MONO, broad=BROAD)
    scored.to_csv(out_dir / "role_scores.csv", index=False)
    shares = class_shares(scored, n_resamples=N_BOOTSTRAP, seed=SEED)
    print(shares.round(3).to_string())
    by_name = scored.set_index("feature")
    for f in features:
        r = by_name.loc[f["name"]]
        f["summary"] = (f"{r['class']}: best role {r['role']} (precision@{TOP_K} {r['precision']:.2f}, AUROC {r['auroc']:.2f}); "
                        f"family {r['family']} ({r['family_precision']:.2f})")
    assert np.isclose(shares.groupby("population")["share"].sum(), 1).all()

# %%
path = save_html(feature_page_html(features, "Rank-1 adapter activations: top examples",
                                   f"{len(token_ids):,} tokens of {len(texts)} traces; each adapter's scalar a = A·x, "
                                   "positive (+) and negative (-) polarity; the marked token is the activating one."),
                 "lora_feature_examples")
print(path)

# %% [markdown]
# ## Figure 2: LoRA features vs MLP neurons vs random directions
# Class shares with 95% bootstrap intervals over features; tests: chi-square on the class counts and
# Mann-Whitney on precision@k and on AUROC, with the differences in means and their bootstrap intervals.

# %%
if ROLE_SCORER:
    save_figure(plot_interpretability(scored, shares), "interpretability_lora_vs_mlp", shares)
    tests = {f"{a} vs {b}": compare_populations(scored, a, b, N_BOOTSTRAP, SEED)
             for a, b in (("LoRA", "MLP neuron"), ("LoRA", "random direction"), ("MLP neuron", "random direction"))}
    print(pd.DataFrame(tests).T.round(4).to_string())
    print(scored.groupby("population")[["precision", "auroc"]].median().round(3))
    print(scored[scored.population == "LoRA"].groupby("role").size().sort_values(ascending=False).head(10))

# %% [markdown]
# ## Headline numbers

# %%
record_headline(SECTION, "tokens_extracted", float(len(token_ids)), unit="tokens", n=len(texts))
if ROLE_SCORER:
    for _, r in shares.iterrows():
        key = f"{r.population.split(' ')[0].lower()}_{r['class']}_share"
        record_headline(SECTION, key, r.share, unit="fraction of features", n=r.n, ci95=[r.lo, r.hi])
    for name, group in scored.groupby("population"):
        record_headline(SECTION, f"{name.split(' ')[0].lower()}_median_precision_at_{TOP_K}", group.precision.median(),
                        unit="fraction", n=len(group))
        record_headline(SECTION, f"{name.split(' ')[0].lower()}_median_auroc", group.auroc.median(), unit="AUROC", n=len(group))
    for pair, t in tests.items():
        key = pair.replace(" vs ", "_vs_").replace(" ", "_").lower()
        record_headline(SECTION, f"{key}_chi2_p", t["chi2_p"], unit="p-value", n=len(scored))
        for column in ("precision", "auroc"):
            record_headline(SECTION, f"{key}_{column}_diff", t[f"{column}_diff"], unit="difference of means", n=len(scored),
                            ci95=[t[f"{column}_diff_lo"], t[f"{column}_diff_hi"]], mannwhitney_p=t[f"{column}_mannwhitney_p"])

# %% [markdown]
# ## The LLM judge (real-scale scorer; runs when `JUDGE_URL` is set)
# Explanation from the top 10 examples (±8 tokens, activations scaled 0-10), detection on 5 held-out top
# examples and 5 random non-activating contexts, and the paper's own measure: the judge's 0/1/2 rating
# (monosemantic / broad but consistent / polysemantic) from the same top examples. `JUDGE_CONCURRENCY`
# requests run at once; every answer is cached under `OUTPUT_DIR/judge/`, so a rerun is free, and finished
# features are kept if the endpoint fails.

# %%
if JUDGE_URL:
    from paper_lib.judge import Judge, non_activating_examples, score_features

    judge = Judge(judge_config, out_dir / "judge" / "cache.jsonl")
    judged = []
    for name, (values, names) in populations.items():
        chosen = np.random.default_rng(SEED).permutation(len(names))[: N_JUDGE_FEATURES or len(names)]
        tops = top_examples(values[:, chosen], [names[i] for i in chosen], token_ids, doc_ids, vocab.__getitem__, k=15, width=8)
        requests = [{"name": t["name"], "explain_with": t["examples"][:10], "activating": t["examples"][10:15],
                     "non_activating": non_activating_examples(values[:, i], token_ids, doc_ids, vocab.__getitem__, 5, 8, SEED)}
                    for t, i in zip(tops, chosen) if len(t["examples"]) >= 15]
        slug = name.split(" ")[0].lower()
        scores = score_features(judge, requests, out_dir / "judge" / f"{slug}.jsonl", rate=True)
        judged.append(pd.DataFrame(scores).assign(population=name))
    judged = pd.concat(judged, ignore_index=True)
    # the paper's measure beside detection: the judge's 0/1/2 rating (monosemantic / broad / polysemantic)
    judged["rated"] = judged["rating"].map({0: "monosemantic", 1: "broad", 2: "polysemantic"}).fillna("unrated")
    print(judged.groupby("population")[["accuracy", "f1"]].mean().round(3))
    print(pd.crosstab(judged["population"], judged["rated"], normalize="index").round(3))
    for name, group in judged.groupby("population"):
        slug = name.split(" ")[0].lower()
        record_headline(SECTION, f"{slug}_judge_detection_accuracy", group.accuracy.mean(), unit="fraction", n=len(group))
        for label in ("monosemantic", "broad", "polysemantic"):
            record_headline(SECTION, f"{slug}_judge_rated_{label}_share", (group.rated == label).mean(), unit="fraction",
                            n=len(group))
