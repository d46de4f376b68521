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
TOP_K = 50  # top tokens per feature and polarity (paper: 50)
CONTEXT = 12  # tokens of context each side on the HTML page (paper: 30)
PAGE_EXAMPLES = 10  # examples per feature on the HTML page
ROLE_SCORER = True  # score against the organism's token roles (organism traces only)
MONO = 0.9  # monosemantic: the best role holds >= MONO of the top-k tokens
BROAD = 0.9  # broad: the best role family holds >= BROAD of the top-k tokens
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
    adjusted_p_values,
    class_shares,
    compare_populations,
    feature_examples,
    quantile_curves,
    score_populations,
    top_features,
)
from paper_lib.judge import judge_config_from
from paper_lib.organism import ROLE_FAMILY, token_roles
from paper_lib.pages import feature_page_html, save_html
from paper_lib.params import check_parameters
from paper_lib.paths import stage_dir, train_run_name
from paper_lib.plotting import plot_interpretability, plot_quantile_detection, save_figure
from paper_lib.results import record_headline, run_info, say, start_run, verdict
from paper_lib.training import adapter_provenance, load_trained

SECTION = "04_interpret_lora_activations"
# every parameter has its default's type (and an allowed value), checked before any work
parameters = check_parameters(globals(), SECTION, choices={"DTYPE": ("float32", "bfloat16", "float16")})
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
# each population read both ways; streamed from the shards, never loaded whole
populations = {name: SignedFeatures(store.features(name)) for name in store.populations}
assert store.populations == [LORA, "MLP neuron", "random direction"]
assert all(np.isfinite(block).all() for block in store.blocks())
print({name: len(features.names) for name, features in populations.items()})

# %% [markdown]
# ## Top examples of every adapter, per polarity (offline HTML page)

# %%
decode = functools.lru_cache(maxsize=None)(lambda i: tokenizer.decode([i]))  # each distinct token decoded once
tops = {name: top_features(features, max(TOP_K, PAGE_EXAMPLES, 15)) for name, features in populations.items()}
features = feature_examples(populations[LORA], store, decode, tops[LORA], k=PAGE_EXAMPLES, width=CONTEXT)
centre = features[0]["examples"][0]
print(features[0]["name"], repr("".join(centre["tokens"])), centre["value"])
assert all(len(f["examples"]) <= PAGE_EXAMPLES for f in features)

# %% [markdown]
# ## Score every feature against the organism's token roles

# %%
if ROLE_SCORER:
    roles = np.concatenate([token_roles(tokenizer, t, MAX_LENGTH) for t in texts])  # one per token, store order
    assert len(roles) == store.n_tokens
    contexts = store.token_contexts()  # for the baselines: what the token alone, or with the one before, tells
    # an adapter's two polarities are one unit (scored["unit"]): intervals resample adapters, not polarities
    scored = score_populations(populations, roles, ROLE_FAMILY, k=TOP_K, mono=MONO, broad=BROAD, tops=tops, tokens=contexts)
    scored.to_csv(out_dir / "role_scores.csv", index=False)
    shares = class_shares(scored, n_resamples=N_BOOTSTRAP, seed=SEED)
    print(shares.round(3).to_string())
    by_name = scored.set_index("feature")
    for f in features:
        r = by_name.loc[f["name"]]
        f["summary"] = (
            f"{r['class']}: best role {r['role']} (precision@{TOP_K} {r['precision']:.2f}, AUROC {r['auroc']:.2f}); "
            f"family {r['family']} ({r['family_precision']:.2f})"
        )
        f["tags"] = {
            "class": r["class"],
            "role": r["role"],
            "family": r["family"],
            "precision": round(float(r["precision"]), 3),
            "auroc": round(float(r["auroc"]), 3),
        }
    assert np.isclose(shares.groupby("population")["share"].sum(), 1).all()

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
# ## Figure 2: LoRA features vs MLP neurons vs random directions
# Class shares with 95% bootstrap intervals over features; tests: chi-square on the class counts and
# Mann-Whitney on precision@k and on AUROC, with the differences in means and their bootstrap intervals.

# %%
if ROLE_SCORER:
    save_figure(plot_interpretability(scored, shares), "interpretability_lora_vs_mlp", shares)
    tests = {
        f"{a} vs {b}": compare_populations(scored, a, b, N_BOOTSTRAP, SEED)
        for a, b in (("LoRA", "MLP neuron"), ("LoRA", "random direction"), ("MLP neuron", "random direction"))
    }
    print(pd.DataFrame(tests).T.round(4).to_string())
    print(scored.groupby("population")[["precision", "auroc"]].median().round(3))
    print(scored[scored.population == "LoRA"].groupby("role").size().sort_values(ascending=False).head(10))
    share = shares.set_index(["population", "class"])["share"]
    interpretable = {p: share[(p, "monosemantic")] + share[(p, "broad")] for p in ("LoRA", "MLP neuron", "random direction")}
    held = interpretable["LoRA"] >= interpretable["MLP neuron"] or tests["LoRA vs MLP neuron"]["chi2_p"] > 0.05
    say(
        SECTION,
        f"**What we see.** Monosemantic / broad / polysemantic: LoRA features "
        f"{share[('LoRA', 'monosemantic')]:.0%} / {share[('LoRA', 'broad')]:.0%} / {share[('LoRA', 'polysemantic')]:.0%}, "
        f"MLP neurons {share[('MLP neuron', 'monosemantic')]:.0%} / {share[('MLP neuron', 'broad')]:.0%} / "
        f"{share[('MLP neuron', 'polysemantic')]:.0%}, random directions {share[('random direction', 'monosemantic')]:.0%} / "
        f"{share[('random direction', 'broad')]:.0%} / {share[('random direction', 'polysemantic')]:.0%} (the paper: LoRA "
        f"16 / 40 / 44%, MLP 13 / 27 / 60%). The adapters are at least as interpretable as MLP neurons: {verdict(held)} "
        f"(chi-square p = {tests['LoRA vs MLP neuron']['chi2_p']:.2g}). "
        + (
            "Random directions score as well: almost any read-out of these inputs is pure at its top on these tokens, "
            "so this scorer separates the populations little here."
            if interpretable["random direction"] >= interpretable["LoRA"]
            else "Random directions score worse: the adapters' directions are not just any read-out."
        ),
    )

# %% [markdown]
# ## Can this scorer tell features apart? Baselines, quantiles and a control
# Top-k purity alone rewards any read-out whose top tokens share an identity. So beside it: (a) the lift
# over a reader of the token alone (and of it with the token before) on the same top-k tokens; (b) the
# best role's share across quantile bins of a feature's activating tokens, not just at the top (delphi's
# detection across quantiles); (c) a control that must score low: the same LoRA features against shuffled
# roles. P-values of the pairwise tests are Benjamini-Hochberg adjusted over all of them.

# %%
if ROLE_SCORER:
    curves = quantile_curves(scored)
    save_figure(plot_quantile_detection(curves), "interpretability_quantiles", curves)
    shuffled = np.random.default_rng(SEED).permutation(roles)
    control = score_populations({LORA: populations[LORA]}, shuffled, ROLE_FAMILY, k=TOP_K, mono=MONO, broad=BROAD, tops=tops)
    control_mono = float((control["class"] == "monosemantic").mean())
    p_values = {f"{pair}: {test}": v[test] for pair, v in tests.items() for test in v if test.endswith("_p")}
    adjusted = adjusted_p_values(p_values)
    lift = scored.groupby("population")[["lift", "bigram_lift"]].median()
    print(lift.round(3).to_string())
    print(curves.round(3).to_string())
    say(
        SECTION,
        "**What we see (baselines).** Median lift of precision@k over the token-identity reader: "
        + ", ".join(f"{p} {lift.loc[p, 'lift']:+.2f} (bigram {lift.loc[p, 'bigram_lift']:+.2f})" for p in lift.index)
        + f". Against shuffled roles {control_mono:.0%} of the LoRA features are monosemantic (the control must score low). "
        + (
            "No population's purity survives the baselines: on these traces the token and the one before it carry the "
            "roles, so figure 2 cannot rank the populations here (the paper's comparison is not testable on them)."
            if lift[["lift", "bigram_lift"]].min(axis=1).max() < 0.05
            else "Some purity survives both baselines: the features tell more than the surface tokens."
        ),
    )
    assert control_mono < 0.2, "features score as monosemantic against shuffled roles: the scorer is not measuring roles"

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
    untrained_roles = roles[: untrained_store.n_tokens]  # the first traces' tokens, in the same order
    untrained_scored = score_populations(
        {f"untrained {name}": SignedFeatures(untrained_store.features(name)) for name in ("MLP neuron", "random direction")},
        untrained_roles,
        ROLE_FAMILY,
        k=TOP_K,
        mono=MONO,
        broad=BROAD,
        tokens=untrained_store.token_contexts(),
    )
    untrained_scored.to_csv(out_dir / "untrained_role_scores.csv", index=False)
    beside = pd.concat([scored, untrained_scored], ignore_index=True)
    beside_shares = class_shares(beside, n_resamples=N_BOOTSTRAP, seed=SEED)
    save_figure(plot_interpretability(beside, beside_shares), "interpretability_untrained_control", beside_shares)
    untrained_lift = untrained_scored.groupby("population")[["precision", "lift", "bigram_lift"]].median()
    untrained_tests = {
        f"LoRA vs {name}": compare_populations(beside, "LoRA", name, N_BOOTSTRAP, SEED) for name in untrained_lift.index
    }
    print(untrained_lift.round(3).to_string())
    print(pd.DataFrame(untrained_tests).T.round(4).to_string())
    u_share = beside_shares.set_index(["population", "class"])["share"]
    say(
        SECTION,
        f"**What we see (untrained control, {len(control_texts)} traces).** On an untrained model of the same shape, "
        + ", ".join(
            f"{name}s score {u_share[(name, 'monosemantic')]:.0%} monosemantic, median precision@{TOP_K} "
            f"{untrained_lift.loc[name, 'precision']:.2f}, lift {untrained_lift.loc[name, 'lift']:+.2f} (bigram "
            f"{untrained_lift.loc[name, 'bigram_lift']:+.2f})"
            for name in untrained_lift.index
        )
        + f"; LoRA features {share[('LoRA', 'monosemantic')]:.0%}, lift {lift.loc['LoRA', 'lift']:+.2f} "
        f"({lift.loc['LoRA', 'bigram_lift']:+.2f}). Mean lift over the token reader, LoRA minus untrained: "
        + ", ".join(
            f"{name.removeprefix('LoRA vs ')} {t['lift_diff']:+.2f} [{t['lift_diff_lo']:+.2f}, {t['lift_diff_hi']:+.2f}]"
            for name, t in untrained_tests.items()
        )
        + "; over the bigram reader: "
        + ", ".join(
            f"{t['bigram_lift_diff']:+.3f} [{t['bigram_lift_diff_lo']:+.3f}, {t['bigram_lift_diff_hi']:+.3f}]"
            for t in untrained_tests.values()
        )
        + ". What the trained features score beyond these is what training put there.",
    )
    assert np.isfinite(untrained_lift.to_numpy()).all()

# %% [markdown]
# ## Headline numbers

# %%
record_headline(SECTION, "tokens_extracted", float(store.n_tokens), unit="tokens", n=len(texts))
if ROLE_SCORER:
    for _, r in shares.iterrows():
        key = f"{r.population.split(' ')[0].lower()}_{r['class']}_share"
        record_headline(SECTION, key, r.share, unit="fraction of features", n=r.n, ci95=[r.lo, r.hi])
    for name, group in scored.groupby("population"):
        record_headline(
            SECTION,
            f"{name.split(' ')[0].lower()}_median_precision_at_{TOP_K}",
            group.precision.median(),
            unit="fraction",
            n=len(group),
        )
        record_headline(SECTION, f"{name.split(' ')[0].lower()}_median_auroc", group.auroc.median(), unit="AUROC", n=len(group))
        for column in ("lift", "bigram_lift"):
            record_headline(
                SECTION, f"{name.split(' ')[0].lower()}_median_{column}", group[column].median(), unit="fraction", n=len(group)
            )
    record_headline(SECTION, "shuffled_roles_monosemantic_share", control_mono, unit="fraction of features", n=len(control))
    if UNTRAINED_CONTROL:
        for name, group in untrained_scored.groupby("population"):
            slug = name.replace(" ", "_").lower()
            record_headline(
                SECTION, f"{slug}_monosemantic_share", u_share[(name, "monosemantic")], unit="fraction of features", n=len(group)
            )
            for column in ("lift", "bigram_lift"):
                record_headline(SECTION, f"{slug}_median_{column}", group[column].median(), unit="fraction", n=len(group))
    for pair, t in tests.items():
        key = pair.replace(" vs ", "_vs_").replace(" ", "_").lower()
        record_headline(
            SECTION, f"{key}_chi2_p", t["chi2_p"], unit="p-value", n=len(scored), bh_adjusted=adjusted[f"{pair}: chi2_p"]
        )
        for column in ("precision", "auroc", "lift", "bigram_lift"):
            record_headline(
                SECTION,
                f"{key}_{column}_diff",
                t[f"{column}_diff"],
                unit="difference of means",
                n=len(scored),
                ci95=[t[f"{column}_diff_lo"], t[f"{column}_diff_hi"]],
                mannwhitney_p=t[f"{column}_mannwhitney_p"],
                mannwhitney_p_bh_adjusted=adjusted[f"{pair}: {column}_mannwhitney_p"],
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
    from paper_lib.judge import Judge, judge_requests, rating_shares, score_features

    judge = Judge(judge_config, out_dir / "judge" / "cache.jsonl")
    judged = []
    for name, signed in populations.items():
        chosen = np.random.default_rng(SEED).permutation(len(signed.names))[: N_JUDGE_FEATURES or len(signed.names)]
        requests = judge_requests(signed, store, decode, tops[name], chosen, SEED)
        slug = name.split(" ")[0].lower()
        scores = score_features(judge, requests, out_dir / "judge" / f"{slug}.jsonl", rate=True)
        judged.append(
            pd.DataFrame(scores, columns=["feature", "explanation", "n", "unparsed", "accuracy", "f1", "rating"]).assign(
                population=name
            )
        )
    judged = pd.concat(judged, ignore_index=True)
    ratings = rating_shares(judged)  # the paper's measure beside detection, with Wilson intervals
    print(judged.groupby("population")[["accuracy", "f1"]].mean().round(3))
    print(ratings.round(3).to_string())
    for name, group in judged.groupby("population"):
        record_headline(
            SECTION,
            f"{name.split(' ')[0].lower()}_judge_detection_accuracy",
            group.accuracy.mean(),
            unit="fraction",
            n=len(group),
        )
    for _, r in ratings[ratings["class"] != "unrated"].iterrows():
        record_headline(
            SECTION,
            f"{r.population.split(' ')[0].lower()}_judge_rated_{r['class']}_share",
            r.share,
            unit="fraction of judged features",
            n=r.n,
            ci95=[r.lo, r.hi],
        )
