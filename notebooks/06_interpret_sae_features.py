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
# # 06 · Interpret SAE features: finer and more monosemantic than the raw adapters
#
# **Claim:** the SAE's features on the adapter state are fine-grained and more often monosemantic than
# the raw adapter scalars (a third-party summary of the paper: ~62% vs ~22%), and they cover the kinds of
# tokens reasoning needs (figure 3: activation mass per category).
#
# Same scorer as notebook 04 (top-k purity against the organism's token roles, same k and thresholds),
# applied to the live SAE latents and to the raw adapter features (each adapter x polarity) on the same
# tokens. An offline dashboard shows every live feature; steering adds a feature's decoder direction to the
# adapter scalars during generation and measures what changes.
#
# Real scale: `run 06_interpret_sae_features -p INTERPRET_DIR runs/04_interpret_32b -p SAE_DIR runs/05_sae_32b
# -p ADAPTER_RUN runs/01_train_32b/rank1 -p DTYPE bfloat16 -p ROLE_SCORER False -p JUDGE_URL http://127.0.0.1:8000/v1
# -p JUDGE_MODEL Qwen/Qwen2.5-72B-Instruct -p BENCHMARK_DIR "" -p MAX_TOKENS 32768 -p OUTPUT_DIR runs/06_sae_32b`.

# %% tags=["parameters"]
SEED = 0  # bootstrap, judge feature sampling
INTERPRET_DIR = "runs/04_interpret"  # notebook 04's output folder (its activations/ store names the traces it read)
SAE_DIR = "runs/05_sae"  # notebook 05's output folder (the trained SAE)
ADAPTER_RUN = "runs/01_train/rank1"  # notebook 01's rank-1 run folder (logit effects, steering)
DTYPE = "float32"  # model dtype (real scale: bfloat16)
DEVICE = "auto"  # auto (every GPU, else the CPU), cpu, cuda:0 ...
TOP_K = 50  # tokens scored per feature for the role scorer (as notebook 04)
SAMPLE_FRACTION = 0.01  # scored tokens drawn from each feature's top 1% (0: its top TOP_K), as notebook 04
CONTEXT_WIDTH = 2  # tokens of surface context the beyond-surface score looks past (as notebook 04)
BEYOND_AUROC = 0.6  # monosemantic also needs this AUROC within contexts (as notebook 04)
PAGE_EXAMPLES = 12  # examples per feature on the dashboard (paper: 32)
CONTEXT = 12  # tokens of context each side on the dashboard (paper: 48)
ROLE_SCORER = True  # score against the organism's token roles (organism traces only)
MONO = 0.9  # monosemantic threshold (as notebook 04)
BROAD = 0.9  # broad threshold (as notebook 04)
MIN_ACTIVE = 10  # a latent firing on fewer of its scored tokens is "rare": unclassified, out of the shares and tests
N_BOOTSTRAP = 2000  # bootstrap resamples
STEER_FEATURE = -1  # latent to steer (-1: the most monosemantic live latent whose role occurs in the completions)
STEER_STRENGTHS = "0,1,2,4"  # multiples of the latent's mean non-zero activation added during generation
BENCHMARK_DIR = "data/organism"  # steering prompts: folder with aime24/ (empty: the hub dataset)
MAX_TOKENS = 160  # generated tokens per response when steering
ANSWER_TOKENS = 32  # tokens for the forced answer section, as notebook 02 (real scale: 2048)
CACHE_TOKENS = 1_048_576  # most tokens per KV cache across a generation batch (32B on 80 GB: 131072)
JUDGE_URL = ""  # OpenAI-compatible endpoint for explanations and categories (empty: skip)
JUDGE_MODEL = ""  # the judge's model name at that endpoint
JUDGE_KEY_ENV = "OPENAI_API_KEY"  # environment variable holding the judge's API key
JUDGE_MAX_TOKENS = 48  # answer tokens per request (0: not sent; reasoning models need thousands)
JUDGE_TOKEN_PARAM = "max_tokens"  # or max_completion_tokens (APIs whose reasoning models refuse max_tokens)
JUDGE_TEMPERATURE = 0.0  # sampling temperature (-1: not sent, for models that refuse one)
JUDGE_CONCURRENCY = 8  # judge requests in flight at once
JUDGE_TIMEOUT = 60.0  # seconds a judge request may take (a reasoning judge writing thousands of tokens: 600)
N_JUDGE_FEATURES = 100  # live latents sent to the judge (0: all)
OUTPUT_DIR = "runs/06_sae_features"  # under data/: scores, steering samples, judge cache
SMOKE = False  # fast check for CI

# %%
import functools

import numpy as np
import pandas as pd
import torch
from IPython.display import HTML, display

from paper_lib.activations import ActivationStore
from paper_lib.config import fingerprint, seed_everything
from paper_lib.data import format_s1_text, load_traces
from paper_lib.engines import ScalarEngine
from paper_lib.evaluation import GenerationSpec, load_benchmark
from paper_lib.interp import (
    SignedFeatures,
    class_shares,
    classified,
    compare_populations,
    feature_examples,
    record_scores,
    record_share_claim,
    sae_comparison,
    score_populations,
    score_tags,
    scored_depth,
    top_features,
)
from paper_lib.judge import judge_config_from
from paper_lib.organism import COMPLETION_ROLES, ROLE_FAMILY, organism_of_roles, token_roles
from paper_lib.pages import feature_page_html, features_html, pick_features, save_html
from paper_lib.params import check_parameters
from paper_lib.paths import stage_dir, train_run_name
from paper_lib.plan import check_plan
from paper_lib.plotting import plot_feature_donut, plot_interpretability, save_figure
from paper_lib.results import claim_verdict, mass_sentence, record_headline, run_info, say, start_run
from paper_lib.sae import (
    LatentFeatures,
    check_sae_adapter,
    decoder_logit_effects,
    decoder_scalars,
    latent_summary,
    load_sae,
    sae_fingerprint,
)
from paper_lib.steering import record_steering, steering_sentence, steering_table
from paper_lib.training import adapter_provenance, load_trained

SECTION = "06_interpret_sae_features"
# every parameter has its default's type (and an allowed value), checked before any work
parameters = check_parameters(globals(), SECTION, choices={"DTYPE": ("float32", "bfloat16", "float16")})
check_plan(SECTION, parameters, SMOKE)  # on a GPU box: the plan printed, and what will not fit refused, first
seed_everything(SEED)
judge_config = judge_config_from(parameters)  # checked now, not after the expensive work
try:  # steering strengths, checked now too: the unsteered baseline first, then rising
    strengths = [float(s) for s in STEER_STRENGTHS.split(",")]
except ValueError:
    raise ValueError(f"STEER_STRENGTHS: expected comma-separated numbers, got {STEER_STRENGTHS!r}") from None
if strengths[0] != 0 or strengths != sorted(set(strengths)) or len(strengths) < 2:
    raise ValueError(f"STEER_STRENGTHS: start at 0 (the unsteered baseline) and rise, e.g. '0,1,2,4'; got {STEER_STRENGTHS!r}")
interp_dir, out_dir = stage_dir(INTERPRET_DIR, SMOKE), stage_dir(OUTPUT_DIR, SMOKE)  # smoke pairs with smoke
start_run(SECTION, out_dir, parameters)  # run.json, figures, headline section

# %% [markdown]
# The store of notebook 04, the SAE of notebook 05 and the adapted model; every live latent read block by
# block from the shards.

# %%
store = ActivationStore(interp_dir / "activations")  # its meta.json names the traces, model and adapter it read
sae, scales = load_sae(stage_dir(SAE_DIR, SMOKE))
check_sae_adapter(store.meta.get("provenance", {}), adapter_provenance(train_run_name(ADAPTER_RUN, SMOKE)))
model, tokenizer, _ = load_trained(
    train_run_name(ADAPTER_RUN, SMOKE), dtype=getattr(torch, DTYPE), device=DEVICE
)  # straight to the GPUs
adapter_state = store.features()  # [tokens, d_in] read shard by shard, never loaded whole
depth = scored_depth(store.n_tokens, TOP_K, SAMPLE_FRACTION) if ROLE_SCORER else TOP_K  # top tokens the scorer samples
summary = latent_summary(sae, scales, adapter_state, k=max(depth, PAGE_EXAMPLES))  # streamed: no [tokens, d_sae] array
fired, d_sae = summary["fired"], sae.cfg.d_sae
live = np.flatnonzero(fired)
sae_features = LatentFeatures(sae, scales, adapter_state, columns=live)  # the live latents, encoded block by block
names = sae_features.names
latent_of = dict(zip(names, live.tolist()))  # feature name -> latent index
lora_signed = SignedFeatures(adapter_state)  # the raw adapter features, both polarities
# their top-k, one streamed pass for the role scorer and the judge alike (each reads the first k it needs)
lora_top = top_features(lora_signed, max(depth, 15)) if ROLE_SCORER or JUDGE_URL else None
print(f"{store.n_tokens:,} tokens; {len(live)} of {d_sae} latents fire at least once")
assert len(live) > 0 and fired.sum() > 0

# %% [markdown]
# ## Dashboard: every live feature's top examples, activation histogram and direct logit effects
# One self-contained HTML file under `figures/` (no network, no server); pick a feature from the list.

# %%
decode = functools.lru_cache(maxsize=None)(lambda i: tokenizer.decode([i]))  # each distinct token decoded once
live_top = (summary["top_values"][live], summary["top_indices"][live])
examples = feature_examples(sae_features, store, decode, live_top, k=PAGE_EXAMPLES, width=CONTEXT)
# logit effects relative to the average live latent's: the raw effects share a few tokens at the top of every latent
average_direction = torch.stack([decoder_scalars(sae, scales, int(latent)) for latent in live]).mean(0)
for entry, latent in zip(examples, live):
    entry["histogram"] = {"counts": summary["hist_counts"][latent].tolist(), "edges": summary["hist_edges"][latent].tolist()}
    entry["logits"] = decoder_logit_effects(
        model, decoder_scalars(sae, scales, int(latent)) - average_direction, store.layers, store.modules, tokenizer, top=6
    )
    entry["logits_label"] = "top logit effects, relative to the average live latent's"
    entry["summary"] = f"fires on {fired[latent]:,} tokens ({fired[latent] / store.n_tokens:.2%})"
    entry["tags"] = {"fired": int(fired[latent]), "mass": round(float(summary["mass"][latent]), 3)}
print(examples[0]["name"], examples[0]["summary"], examples[0]["logits"][:3])

# %% [markdown]
# ## SAE features vs raw adapter features under one scorer

# %%
if ROLE_SCORER:
    traces = load_traces(store.meta["provenance"]["traces"])
    texts = [format_s1_text(tokenizer, row) for row in traces.select(range(len(store)))]
    roles = np.concatenate([token_roles(tokenizer, t, store.meta["max_length"]) for t in texts])  # store order
    assert store.meta["texts"] == fingerprint(texts), "the traces read differently now than when they were extracted"
    assert len(roles) == store.n_tokens
    design = dict(k=TOP_K, mono=MONO, broad=BROAD, sample_fraction=SAMPLE_FRACTION or None, beyond=BEYOND_AUROC)
    design |= dict(context_width=CONTEXT_WIDTH, seed=SEED, min_active=MIN_ACTIVE)  # a sparse latent: where it fires
    scored = score_populations(
        {"SAE feature": sae_features, "LoRA": lora_signed},
        roles,
        ROLE_FAMILY,
        tops={"SAE feature": live_top, "LoRA": lora_top},
        tokens=store.token_contexts(),  # the surface the beyond-surface score must see past
        **design,
    )  # an adapter's two polarities are one unit (scored["unit"]): intervals resample adapters, not polarities
    scored.to_csv(out_dir / "role_scores.csv", index=False)
    shares = class_shares(scored, n_resamples=N_BOOTSTRAP, seed=SEED)
    test = compare_populations(scored, "SAE feature", "LoRA", N_BOOTSTRAP, SEED)
    print(shares.pivot(index="population", columns="class", values="share").round(3).to_string())
    save_figure(plot_interpretability(scored, shares), "interpretability_sae_vs_lora", shares)
    finer = claim_verdict(test["monosemantic_share_diff_lo"], test["monosemantic_share_diff_hi"], low=0.0)
    say(SECTION, sae_comparison(shares, test, finer, len(live), MIN_ACTIVE))

# %% [markdown]
# Each latent's score on the dashboard: its class, best role and family, purity and AUROCs.

# %%
if ROLE_SCORER:
    sae_scores = scored[scored.population == "SAE feature"].set_index("feature")
    for entry in examples:
        said, tags = score_tags(sae_scores.loc[entry["name"]])
        entry["summary"] += "; " + said
        entry["tags"].update(tags)

# %%
path = save_html(
    feature_page_html(
        examples,
        "SAE features on the rank-1 adapter state",
        f"{len(live)} live latents of {d_sae}; {store.n_tokens:,} tokens. Histogram: the "
        "latent's non-zero activations; logit effects: its decoder direction through the o_proj and "
        "down_proj adapters' B vectors and the unembedding, relative to the average live latent's.",
        run=run_info(SECTION),
    ),
    "sae_feature_dashboard",
)
print(path)

# %% [markdown]
# Three latents as the page shows them (the monosemantic ones with the highest beyond-surface AUROC first,
# when the role scorer ran): each one's top examples, the activating token outlined, every token shaded by
# the activation.

# %%
display(HTML(features_html(pick_features(examples, 3))))

# %% [markdown]
# ## Figure 3: activation mass per category
# On the organism a feature's category is the family of its best-matching role and its subcategory the
# role itself; mass = the feature's summed activation over all tokens.

# %%
if ROLE_SCORER:
    mass = (
        pd.DataFrame(
            {
                "category": sae_scores.loc[names, "family"].to_numpy(),
                "subcategory": sae_scores.loc[names, "role"].to_numpy(),
                "mass": summary["mass"][live],
            }
        )
        .groupby(["category", "subcategory"], as_index=False)["mass"]
        .sum()
    )
    save_figure(plot_feature_donut(mass), "sae_feature_categories", mass)
    say(SECTION, mass_sentence(mass))

# %% [markdown]
# ## Steering: add a feature's decoder direction to the adapter scalars while generating
# The latent's decoder row (in adapter units) times a strength (multiples of its mean non-zero
# activation) is added to every adapter scalar at every generated position. Measured on the AIME-like
# questions: how often the feature's role appears among the generated tokens, the number of thinking
# steps written, and accuracy. The control: a random direction of the same norm, added at the same
# strengths; what the latent does beyond it is the latent's own effect.

# %%
if ROLE_SCORER:
    # roles the AIME-like completions contain (no option scan there), so their rate can move either way
    organism = organism_of_roles(roles)
    candidates = classified(sae_scores)
    candidates = candidates[candidates.role.isin(COMPLETION_ROLES[organism])].sort_values(["precision", "auroc"], ascending=False)
    steer = latent_of[candidates.index[0]] if STEER_FEATURE < 0 else STEER_FEATURE
    role = sae_scores.loc[f"latent {steer}", "role"]
    unit = float(summary["mass"][steer] / summary["fired"][steer])  # mean non-zero activation
    direction = decoder_scalars(sae, scales, steer).reshape(len(store.layers), len(store.modules))
    control = torch.randn(direction.shape, generator=torch.Generator().manual_seed(SEED), dtype=direction.dtype)
    control *= direction.norm() / control.norm()  # equal norm: the same push in a direction chosen at random
    transforms = {f"x{s:g}": (lambda a, s=s: a + s * unit * direction) for s in strengths}
    transforms |= {f"random_x{s:g}": (lambda a, s=s: a + s * unit * control) for s in strengths if s}
    steered = {"sae": sae_fingerprint(stage_dir(SAE_DIR, SMOKE)), "latent": int(steer), "unit": unit}  # what steers
    engine = ScalarEngine(model, tokenizer, transforms, cache_tokens=CACHE_TOKENS, provenance=steered)
    items = load_benchmark("aime24", f"{BENCHMARK_DIR}/aime24" if BENCHMARK_DIR else None)[: 4 if SMOKE else None]
    gen = GenerationSpec(max_tokens=MAX_TOKENS, answer_tokens=ANSWER_TOKENS, seed=SEED)
    steering = steering_table(engine, items, gen, out_dir / "steering", steer, role, organism)
    print(f"steering latent {steer} (best role {role}, unit {unit:.3f})")
    print(steering.drop(columns="example").round(3).to_string())
    print("before:", repr(steering.example.iloc[0][:120]))
    print("after: ", repr(steering[steering.direction == "latent"].example.iloc[-1][:120]))
    say(SECTION, steering_sentence(steer, role, steering))

# %% [markdown]
# ## Headline numbers

# %%
record_headline(SECTION, "live_latents", float(len(live)), unit="latents", n=int(d_sae))
if ROLE_SCORER:
    record_scores(SECTION, scored, shares, {"SAE feature vs LoRA": test})
    record_share_claim(SECTION, "sae_finer_than_lora", test, finer, len(scored))
    record_steering(SECTION, steering, steer, role)

# %% [markdown]
# ## The LLM judge: SAE features vs raw adapters under one protocol, and the paper's seven categories
# Runs when `JUDGE_URL` is set. The SAE's live latents and the raw adapter features (each adapter x
# polarity) are judged alike (notebook 04's protocol: explanation from the top 10 examples, detection on 5
# more and 5 non-activating contexts, the 0/1/2 rating): the paper's SAE-vs-raw comparison. The sample is a
# simple random one of `N_JUDGE_FEATURES` per population (0: all), so shares carry Wilson intervals. Each
# judged latent's explanation is then put in one of the paper's seven categories; the donut weighs them by
# activation mass.

# %%
if JUDGE_URL:
    from paper_lib.judge import (
        Judge,
        categorise_features,
        category_shares,
        judge_populations,
        rating_shares,
        record_category_shares,
        record_judge_detection,
        record_judge_ratings,
    )

    judge = Judge(judge_config, out_dir / "judge" / "cache.jsonl")
    chosen = {"SAE feature": (sae_features, live_top), "LoRA": (lora_signed, lora_top)}
    judged = judge_populations(judge, chosen, store, decode, N_JUDGE_FEATURES, SEED, out_dir / "judge")
    ratings = rating_shares(judged)
    print(judged.groupby("population")[["accuracy", "hard_accuracy", "f1"]].mean().round(3))
    print(ratings.round(3).to_string())
    record_judge_detection(SECTION, judged)
    record_judge_ratings(SECTION, ratings)

# %% [markdown]
# The judge's categories for the judged latents (the paper's seven), and the activation mass in each.

# %%
if JUDGE_URL:
    sae_judged = judged[judged.population == "SAE feature"]
    categories = pd.DataFrame(
        categorise_features(
            judge,
            [{"name": r.feature, "explanation": r.explanation} for r in sae_judged.itertuples()],
            out_dir / "judge" / "categories.jsonl",
        ),
        columns=["feature", "explanation", "category", "subcategory"],
    )
    categories["mass"] = [float(summary["mass"][latent_of[f]]) for f in categories.feature]
    categories.to_csv(out_dir / "judge_categories.csv", index=False)
    shares = category_shares(categories)
    print(shares.round(3).to_string())
    if len(categories):
        mass_llm = categories.groupby(["category", "subcategory"], as_index=False)["mass"].sum()
        save_figure(
            plot_feature_donut(mass_llm, "SAE features: activation mass by LLM category"), "sae_feature_categories_llm", mass_llm
        )
    record_category_shares(SECTION, shares, len(categories))
