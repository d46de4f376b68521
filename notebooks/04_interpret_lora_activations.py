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
DEVICE = "auto"  # auto (every GPU, else the CPU), cpu, cuda:0 ...
MERGED = False  # extraction: fold B·A into W (fastest; exact in float32 only) instead of the unmerged arithmetic
TOP_K = 50  # tokens scored per feature and polarity (paper: its top 50)
SAMPLE_FRACTION = 0.01  # scored tokens drawn from each feature's top 1% (0: its top TOP_K, the paper's design)
CONTEXT_WIDTH = 2  # tokens of surface context the beyond-surface score looks past (2: the token and the one before)
BEYOND_AUROC = 0.6  # monosemantic also needs this AUROC within contexts (and p < 0.001 against chance)
EQUIVALENCE_MARGIN = 0.1  # "about as interpretable": LoRA minus MLP monosemantic share within this, interval and all
CORPUS_SIZES = "250,500,1000"  # traces at which the LoRA shares are recomputed (they must not move)
CONTEXT = 12  # tokens of context each side on the HTML page (paper: 30)
PAGE_EXAMPLES = 10  # examples per feature on the HTML page
ROLE_SCORER = True  # score against the organism's token roles (organism traces only)
MONO = 0.9  # monosemantic or surface: the best role holds >= MONO of the scored tokens
BROAD = 0.9  # broad: the best role family holds >= BROAD of the scored tokens
N_BOOTSTRAP = 2000  # bootstrap resamples
UNTRAINED_CONTROL = True  # the scorer's control: the same read-outs on an untrained model of the same shape
CONTROL_TRACES = 0  # traces that control extracts (0: the same traces as above; real scale: e.g. 100)
JUDGE_URL = ""  # OpenAI-compatible endpoint for the LLM scorer, e.g. http://127.0.0.1:8000/v1 (empty: skip)
JUDGE_MODEL = ""  # the judge's model name at that endpoint
JUDGE_KEY_ENV = "OPENAI_API_KEY"  # environment variable holding the judge's API key
JUDGE_MAX_TOKENS = 48  # answer tokens per request (0: not sent; reasoning models need thousands)
JUDGE_TOKEN_PARAM = "max_tokens"  # or max_completion_tokens (APIs whose reasoning models refuse max_tokens)
JUDGE_TEMPERATURE = 0.0  # sampling temperature (-1: not sent, for models that refuse one)
JUDGE_CONCURRENCY = 8  # judge requests in flight at once
JUDGE_TIMEOUT = 60.0  # seconds a judge request may take (a reasoning judge writing thousands of tokens: 600)
N_JUDGE_FEATURES = 40  # features per population sent to the judge (0: all)
OUTPUT_DIR = "runs/04_interpret"  # under data/: activation shards, scores, judge cache
OVERWRITE = False  # redo the extraction even if its shards exist
SMOKE = False  # fast check for CI: a few traces

# %%
import functools
import shutil
import time

import numpy as np
import pandas as pd
import torch
from IPython.display import HTML, display

from paper_lib.activations import (
    LORA,
    adapter_keys,
    build_readout_model,
    control_populations,
    extract_activation_shards,
    randomize_weights,
)
from paper_lib.config import seed_everything
from paper_lib.data import format_s1_text, load_traces
from paper_lib.interp import (
    SignedFeatures,
    class_shares,
    compare_populations,
    context_keys,
    control_sentence,
    control_summary,
    feature_examples,
    population_comparison,
    quantile_curves,
    record_scores,
    record_share_claim,
    score_populations,
    score_tags,
    scored_depth,
    shares_by_corpus_size,
    shuffle_within_contexts,
    top_features,
    untrained_sentence,
)
from paper_lib.judge import judge_config_from
from paper_lib.organism import ROLE_FAMILY, token_roles
from paper_lib.pages import feature_page_html, features_html, pick_features, save_html
from paper_lib.params import check_parameters
from paper_lib.paths import stage_dir, train_run_name
from paper_lib.plan import check_plan
from paper_lib.plotting import plot_interpretability, plot_quantile_detection, plot_shares_by_size, save_figure
from paper_lib.results import claim_verdict, record_headline, run_info, say, start_run
from paper_lib.training import adapter_provenance, load_trained

SECTION = "04_interpret_lora_activations"
# every parameter has its default's type (and an allowed value), checked before any work
parameters = check_parameters(globals(), SECTION, choices={"DTYPE": ("float32", "bfloat16", "float16")})
check_plan(SECTION, parameters, SMOKE)  # on a GPU box: the plan printed, and what will not fit refused, first
seed_everything(SEED)
judge_config = judge_config_from(parameters)  # checked now, not after the expensive work
out_dir = stage_dir(OUTPUT_DIR, SMOKE)  # a smoke run never clashes with a full one
adapter_run = train_run_name(ADAPTER_RUN, SMOKE)  # and reads notebook 01's smoke run
# straight to the device in the model's dtype: no full host copy of a 32B model
peft_model, tokenizer, train_cfg = load_trained(adapter_run, dtype=getattr(torch, DTYPE), device=DEVICE)
model = build_readout_model(peft_model, merged=MERGED)  # consumes the PEFT model: no copy at 32B
traces = load_traces(TRACES)
n_traces = 40 if SMOKE else (N_TRACES or len(traces))
texts = [format_s1_text(tokenizer, row) for row in traces.select(range(min(n_traces, len(traces))))]
print(f"{len(texts)} traces; adapters read from the extra output of each projection (merged={MERGED})")

# %% [markdown]
# ## Extract the three populations of every token, in one forward pass
# The adapter scalars, and as many randomly sampled MLP neurons and random directions in the adapters' own
# input spaces, all read on the same fine-tuned model over the same tokens in the same pass. Shards of
# whole traces (float16), resumable; `run.json` beside them records this notebook's parameters.

# %%
store_dir = out_dir / "activations"
if OVERWRITE and store_dir.exists():
    shutil.rmtree(store_dir)
start_run(SECTION, out_dir, parameters)  # run.json, figures, headlines
controls = control_populations(model, adapter_keys(model), seed=SEED)  # as many MLP neurons and random directions as adapters
provenance = {**adapter_provenance(adapter_run), "traces": TRACES}  # what produced the scalars (hashes the adapter)
start = time.perf_counter()
store = extract_activation_shards(
    model,
    tokenizer,
    texts,
    store_dir,
    batch_size=BATCH_SIZE,
    max_length=MAX_LENGTH,
    provenance=provenance,
    populations=controls,
)
seconds = time.perf_counter() - start
print(
    f"{store.n_tokens:,} tokens x {len(store.feature_names())} adapters (+ {len(controls)} control populations) in "
    f"{seconds:.1f} s ({store.n_tokens / seconds:,.0f} tok/s, 0 if the shards existed)"
)

# %%
# each population read both ways; streamed from the shards, never loaded whole
populations = {name: SignedFeatures(store.features(name)) for name in store.populations}
assert store.populations == [LORA, "MLP neuron", "random direction"]
assert all(np.isfinite(block).all() for block in store.blocks())
print({name: len(features.names) for name, features in populations.items()})

# %% [markdown]
# ## Top examples of every adapter, per polarity (offline HTML page)

# %%
decode = functools.lru_cache(maxsize=None)(lambda i: tokenizer.decode([i]))  # each distinct token decoded once
depth = scored_depth(store.n_tokens, TOP_K, SAMPLE_FRACTION)  # the top tokens the scorer samples from
tops = {name: top_features(features, max(depth, PAGE_EXAMPLES, 15)) for name, features in populations.items()}
features = feature_examples(populations[LORA], store, decode, tops[LORA], k=PAGE_EXAMPLES, width=CONTEXT)
centre = features[0]["examples"][0]
print(features[0]["name"], repr("".join(centre["tokens"])), centre["value"])
assert all(len(f["examples"]) <= PAGE_EXAMPLES for f in features)

# %% [markdown]
# ## Score every feature against the organism's token roles
# Every token of a trace has a known role (a carried, computed, wrapped or copied value, an erroneous step,
# the token before "Wait"...). The scorer's definitions, stated here because every number below rests on
# them:
#
# - **Scored tokens:** `TOP_K` tokens drawn at random from the feature's top `SAMPLE_FRACTION` of all tokens
#   (where it fires). A top-k grows purer as the corpus grows (its top is a thinner tail), so its shares
#   cannot be compared across corpora; a fixed fraction can (checked below at three corpus sizes).
# - **Purity:** the share of the scored tokens that hold the feature's most common role among them.
# - **Beyond the surface:** among tokens that share a context (the token and the `CONTEXT_WIDTH - 1` before
#   it), how well the feature ranks its role above the others, pooled over contexts (a stratified AUROC,
#   computed on every token but the scored ones that chose the role). 0.5: the feature knows nothing that the
#   tokens under it do not.
# - **Classes:** *monosemantic*: purity >= `MONO` and beyond-surface AUROC >= `BEYOND_AUROC`, one-sided
#   p < 0.001 under roles shuffled within contexts; *surface*: that pure, but not beyond the tokens under it
#   (a bigram detector); *broad*: one role family holds >= `BROAD`; else *polysemantic*; *rare*: fires on
#   fewer than k/5 tokens, unclassified.

# %%
if ROLE_SCORER:
    roles = np.concatenate(trace_roles := [token_roles(tokenizer, t, MAX_LENGTH) for t in texts])  # one per token
    assert len(roles) == store.n_tokens
    contexts = store.token_contexts()  # token ids and the ids before them: the surface the scorer must see past
    design = dict(k=TOP_K, mono=MONO, broad=BROAD, tokens=contexts, sample_fraction=SAMPLE_FRACTION or None, beyond=BEYOND_AUROC)
    design |= dict(context_width=CONTEXT_WIDTH, seed=SEED)
    # an adapter's two polarities are one unit (scored["unit"]): intervals resample adapters, not polarities
    scored = score_populations(populations, roles, ROLE_FAMILY, tops=tops, **design)
    scored.to_csv(out_dir / "role_scores.csv", index=False)
    shares = class_shares(scored, n_resamples=N_BOOTSTRAP, seed=SEED)
    print(shares.pivot(index="population", columns="class", values="share").round(3).to_string())
    assert np.isclose(shares.groupby("population")["share"].sum(), 1).all()

# %%
if ROLE_SCORER:
    by_name = scored.set_index("feature")
    for f in features:
        f["summary"], f["tags"] = score_tags(by_name.loc[f["name"]])

# %%
for f in features:  # L{layer}.{module}{+/-}: filter by layer and module
    layer, module = f["name"][1:-1].split(".")
    f.setdefault("tags", {}).update(layer=f"L{int(layer):02d}", module=module)
path = save_html(
    feature_page_html(
        features,
        "Rank-1 adapter activations: top examples",
        f"{store.n_tokens:,} tokens of {len(texts)} traces; each adapter's scalar a = A·x, "
        "positive (+) and negative (-) polarity; the marked token is the activating one.",
        run=run_info(SECTION),
    ),
    "lora_feature_examples",
)
print(path)

# %% [markdown]
# Three adapters as the page shows them (the monosemantic ones with the highest beyond-surface AUROC first,
# when the role scorer ran): each one's top examples, the activating token outlined, every token shaded by
# the activation.

# %%
display(HTML(features_html(pick_features(features, 3))))

# %% [markdown]
# ## Figure 2: LoRA features vs MLP neurons vs random directions
# Class shares with 95% intervals that resample whole read-outs (an adapter's two polarities together);
# the comparison the paper makes, LoRA vs MLP neurons, is judged on the difference of their monosemantic
# (beyond the surface) shares: "about as interpretable" is **reproduced** when its interval lies within
# ±`EQUIVALENCE_MARGIN`, **not reproduced** when it lies outside, **cannot decide** otherwise. AUROCs (over
# all tokens and within contexts) stand beside it.

# %%
if ROLE_SCORER:
    save_figure(plot_interpretability(scored, shares), "interpretability_lora_vs_mlp", shares)
    pairs = (("LoRA", "MLP neuron"), ("LoRA", "random direction"), ("MLP neuron", "random direction"))
    tests = {f"{a} vs {b}": compare_populations(scored, a, b, N_BOOTSTRAP, SEED) for a, b in pairs}
    print(pd.DataFrame(tests).T.filter(regex="monosemantic|auroc").round(3).to_string())
    versus = tests["LoRA vs MLP neuron"]
    as_interpretable = claim_verdict(
        versus["monosemantic_share_diff_lo"], versus["monosemantic_share_diff_hi"], -EQUIVALENCE_MARGIN, EQUIVALENCE_MARGIN
    )
    say(SECTION, population_comparison(shares, tests, "LoRA", "MLP neuron", as_interpretable, EQUIVALENCE_MARGIN))

# %% [markdown]
# ## Detection across activation quantiles
# The best role's share in each of five equal-count bins of a feature's activating tokens (its top 10%),
# not just at its top (delphi's detection across quantiles): median and interquartile range over features.

# %%
if ROLE_SCORER:
    curves = quantile_curves(scored)
    save_figure(plot_quantile_detection(curves), "interpretability_quantiles", curves)
    print(curves.pivot(index="quantile", columns="population", values="median").round(3).to_string())

# %% [markdown]
# ## Controls that can fail: roles shuffled globally and within contexts
# Two controls on the LoRA features. Roles shuffled over all tokens: nothing can be pure, so this only
# checks that roles are read at all. Roles shuffled *within each context*: what the tokens under a feature
# tell is kept exactly, what the model's state adds is destroyed; a surface reader keeps its purity (and
# stays *surface*), a feature that knew the hidden role loses it. So the share monosemantic under it must
# fall to about zero: if it did not, the beyond-surface score would be crediting the surface. The same
# control gives the scorer's own bias from choosing each feature's best role on its own tokens.

# %%
if ROLE_SCORER:
    shuffles = {
        "shuffled globally": np.random.default_rng(SEED).permutation(roles),
        "shuffled within contexts": shuffle_within_contexts(roles, context_keys(*contexts, CONTEXT_WIDTH), SEED),
    }
    control = pd.concat(
        [scored[scored.population == LORA].assign(roles="roles")]  # the real roles: the scores above
        + [
            score_populations({LORA: populations[LORA]}, r, ROLE_FAMILY, tops=tops, **design).assign(roles=name)
            for name, r in shuffles.items()
        ]
    )
    controls = control_summary(control)
    print(controls.round(3).to_string())
    say(SECTION, control_sentence(controls))
    assert controls.loc["shuffled within contexts", "monosemantic"] < 0.05, "the beyond-surface score credits the surface"
    assert controls.loc["shuffled globally", ["monosemantic", "surface"]].sum() < 0.05, "the scorer is not reading roles"

# %% [markdown]
# ## Shares that do not move with the corpus
# The same LoRA features scored on the first 250, 500 and 1,000 traces: on the fixed sampling design the
# shares should agree within their intervals (on a top-k they rose with the corpus).

# %%
if ROLE_SCORER:
    sizes = [n for n in map(int, CORPUS_SIZES.split(",")) if n < len(texts)] if not SMOKE else [10, 20]
    by_size = shares_by_corpus_size(
        LORA,
        populations[LORA],
        roles,
        contexts,
        [len(r) for r in trace_roles],
        sizes,
        ROLE_FAMILY,
        N_BOOTSTRAP,
        **{k: v for k, v in design.items() if k != "tokens"},
    )
    by_size = pd.concat([by_size, shares[shares.population == LORA].assign(documents=len(texts))], ignore_index=True)
    save_figure(plot_shares_by_size(by_size), "interpretability_corpus_size", by_size)
    mono = by_size[by_size["class"] == "monosemantic"].set_index("documents")
    print(mono[["share", "lo", "hi", "n"]].round(3).to_string())
    agree = mono["lo"].max() <= mono["hi"].min()  # one share inside every interval
    say(
        SECTION,
        f"**What we see (corpus size).** Monosemantic share of the LoRA features on {', '.join(f'{n:,}' for n in mono.index)} traces: "
        + ", ".join(f"{r.share:.0%} [{r.lo:.0%}, {r.hi:.0%}]" for r in mono.itertuples())
        + f": {'the intervals share a common value' if agree else 'the intervals do not overlap: the share moves with the corpus'}.",
    )

# %% [markdown]
# ## The same read-outs on an untrained model: what the scorer gives for nothing
# The model's weights re-drawn in place as an untrained Qwen2 of the same shape (the fine-tuned weights are
# not used after this), the same tokens extracted again, and its random directions and MLP neurons scored
# as above. Whatever they score is what a read-out gets from the tokens and their positions alone; a
# population of the trained model means something only as far as it scores above them.

# %%
if ROLE_SCORER and UNTRAINED_CONTROL:
    control_texts = texts[: 20 if SMOKE else (CONTROL_TRACES or len(texts))]
    control_dir = out_dir / "untrained_activations"
    if OVERWRITE and control_dir.exists():
        shutil.rmtree(control_dir)
    untrained = randomize_weights(model, seed=SEED)  # in place: no second copy of the model
    untrained_store = extract_activation_shards(
        untrained,
        tokenizer,
        control_texts,
        control_dir,
        batch_size=BATCH_SIZE,
        max_length=MAX_LENGTH,
        provenance=provenance | {"weights": f"untrained, seed {SEED}"},
        populations=control_populations(untrained, adapter_keys(untrained), seed=SEED),
    )

# %%
if ROLE_SCORER and UNTRAINED_CONTROL:
    untrained_populations = {
        f"untrained {n}": SignedFeatures(untrained_store.features(n)) for n in ("MLP neuron", "random direction")
    }
    untrained_design = design | {"tokens": untrained_store.token_contexts()}  # the first traces' tokens, same order
    untrained_scored = score_populations(
        untrained_populations, roles[: untrained_store.n_tokens], ROLE_FAMILY, **untrained_design
    )
    untrained_scored.to_csv(out_dir / "untrained_role_scores.csv", index=False)
    beside = pd.concat([scored, untrained_scored], ignore_index=True)
    beside_shares = class_shares(beside, n_resamples=N_BOOTSTRAP, seed=SEED)
    save_figure(plot_interpretability(beside, beside_shares), "interpretability_untrained_control", beside_shares)
    untrained_tests = {
        f"LoRA vs {name}": compare_populations(beside, "LoRA", name, N_BOOTSTRAP, SEED) for name in untrained_populations
    }
    print(pd.DataFrame(untrained_tests).T.filter(regex="monosemantic|context").round(3).to_string())
    say(SECTION, untrained_sentence(beside_shares, untrained_tests, len(control_texts)))
    assert set(beside_shares["population"]) == set(scored["population"]) | set(untrained_populations)

# %% [markdown]
# ## Headline numbers

# %%
record_headline(SECTION, "tokens_extracted", float(store.n_tokens), unit="tokens", n=len(texts))
if ROLE_SCORER:
    record_scores(SECTION, scored, shares, tests)
    record_share_claim(SECTION, "lora_vs_mlp_as_interpretable", versus, as_interpretable, len(scored), margin=EQUIVALENCE_MARGIN)
    for name, row in controls.iterrows():  # the real roles and the two shuffles
        slug = name.replace(" ", "_")
        for column in ("monosemantic", "surface", "median_context_auroc", "mean_context_lift"):
            record_headline(SECTION, f"control_{slug}_{column}", row[column], unit="fraction or score", n=int(row["n"]))
    for r in mono.itertuples():
        record_headline(
            SECTION, f"lora_monosemantic_share_at_{r.Index}_traces", r.share, unit="fraction", n=r.n, ci95=[r.lo, r.hi]
        )
    if UNTRAINED_CONTROL:
        record_scores(
            SECTION, untrained_scored, beside_shares[beside_shares.population.str.startswith("untrained")], untrained_tests
        )

# %% [markdown]
# ## The LLM judge (real-scale scorer; runs when `JUDGE_URL` is set)
# Explanation from the top 10 examples (±8 tokens, activations scaled 0-10), detection on 5 held-out top
# examples and 5 random non-activating contexts, and the paper's own measure: the judge's 0/1/2 rating
# (monosemantic / broad but consistent / polysemantic) from the same top examples. `JUDGE_CONCURRENCY`
# requests run at once; every answer is cached under `OUTPUT_DIR/judge/`, so a rerun is free, and finished
# features are kept if the endpoint fails.

# %%
if JUDGE_URL:
    from paper_lib.judge import Judge, judge_populations, rating_shares, record_judge_detection, record_judge_ratings

    judge = Judge(judge_config, out_dir / "judge" / "cache.jsonl")
    chosen = {name: (signed, tops[name]) for name, signed in populations.items()}
    judged = judge_populations(judge, chosen, store, decode, N_JUDGE_FEATURES, SEED, out_dir / "judge")
    ratings = rating_shares(judged)  # the paper's measure beside detection, with Wilson intervals
    print(judged.groupby("population")[["accuracy", "hard_accuracy", "f1"]].mean().round(3))
    print(ratings.round(3).to_string())
    record_judge_detection(SECTION, judged)
    record_judge_ratings(SECTION, ratings)
