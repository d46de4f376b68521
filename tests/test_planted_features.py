"""The role scorer against features whose answer is known, built from the organism's own traces and roles
and scored exactly as notebook 04 calls it (``score_populations`` with the token contexts). A measure is
trusted only as far as it gets these right, and a control only if a surface reader and a hidden-state
detector come out of it differently."""

import numpy as np
import pandas as pd
import pytest

from paper_lib.interp import (
    ArrayFeatures,
    SignedFeatures,
    class_shares,
    context_keys,
    score_populations,
    shuffle_within_contexts,
    stratified_auroc,
)
from paper_lib.organism import ROLE_FAMILY


@pytest.fixture(scope="module")
def corpus(organism):
    """300 of the organism's traces: token ids, previous ids (-1 at a trace's start), roles."""
    from paper_lib.data import format_s1_text, load_traces
    from paper_lib.organism import token_roles
    from tests.conftest import ORGANISM_DIR

    _, tok, _ = organism
    texts = [format_s1_text(tok, row) for row in load_traces(str(ORGANISM_DIR / "s1K-1.1")).select(range(300))]
    docs = [np.asarray(tok(t, add_special_tokens=False)["input_ids"], np.int64) for t in texts]
    ids = np.concatenate(docs)
    previous = np.concatenate([np.r_[-1, d[:-1]] for d in docs])
    roles = np.concatenate([token_roles(tok, t) for t in texts])
    assert len(roles) == len(ids)
    return ids, previous, roles


def planted(ids, previous, roles):
    """Features with a known answer, and the class each must get."""
    rng = np.random.default_rng(0)
    n = len(roles)
    context = context_keys(ids, previous, 2)
    frame = pd.DataFrame({"context": context, "role": roles, "id": ids})
    # two roles that share contexts: tokens whose bigram alone cannot say which of the two they are
    shared = frame.groupby("context")["role"].agg(lambda r: frozenset(r))
    pairs = frame.assign(roles=shared.loc[context].to_numpy()).query("roles.str.len() > 1")
    counts = pairs.groupby("role").size().sort_values(ascending=False)
    hidden_role = counts.index[0]
    in_shared = np.isin(context, pairs["context"].unique())
    # a token id whose role is fixed ~95% of the time, and a bigram whose role is fixed
    by_id = frame.groupby("id")["role"].agg(lambda r: r.value_counts(normalize=True).iloc[0])
    sizes = frame.groupby("id").size()
    token_id = sizes[(by_id > 0.9) & (by_id < 1.0) & (sizes >= 100)].index[0]  # 93% one role, 7% others
    pure_id = sizes[by_id == 1.0].idxmax()
    pure = frame.groupby("context")["role"].nunique().eq(1) & frame.groupby("context").size().ge(100)
    bigram = pure[pure].index[0]
    # one role everywhere, three roles of three families evenly
    one_role = "computed_value"
    three = ["carried_value", "newline", "read_mark"]
    assert len({ROLE_FAMILY[r] for r in three}) == 3
    evenly = np.zeros(n)
    for role in three:
        evenly[rng.choice(np.flatnonzero(roles == role), 300, replace=False)] = 1.0
    jitter = lambda fires: fires * rng.uniform(1, 1.01, n)  # noqa: E731  (breaks ties, carries no information)
    features = {
        "one role": (jitter(roles == one_role), "monosemantic"),
        "three roles": (jitter(evenly), "polysemantic"),
        "token id": (jitter(ids == token_id), "surface"),
        "pure token id": (jitter(ids == pure_id), "surface"),
        "bigram": (jitter(context == bigram), "surface"),
        "hidden state": (jitter((roles == hidden_role) & in_shared), "monosemantic"),
        "noise": (rng.normal(size=n), "polysemantic"),
        "three tokens": (np.isin(np.arange(n), rng.choice(n, 3, replace=False)).astype(float), "rare"),
    }
    values = np.stack([v for v, _ in features.values()], 1).astype(np.float32)
    return ArrayFeatures(values, list(features), block=5000), {name: want for name, (_, want) in features.items()}


def classes_of(features, roles, tokens, **kwargs):
    scored = score_populations({"planted": features}, roles, ROLE_FAMILY, k=50, mono=0.9, broad=0.9, tokens=tokens, **kwargs)
    return scored.set_index("feature")


def test_planted_features_get_their_classes(corpus):
    ids, previous, roles = corpus
    features, expected = planted(ids, previous, roles)
    scored = classes_of(features, roles, (ids, previous))
    # the 93% token's top 50 may hold more or fewer than 5 tokens of other roles: surface or impure, never more
    assert scored["class"].drop("token id").to_dict() == {k: v for k, v in expected.items() if k != "token id"}
    assert scored.loc["token id", "class"] in ("surface", "polysemantic", "broad")
    # the surface readers are as pure as the hidden-state detector: purity alone cannot tell them apart
    assert scored.loc["pure token id", "precision"] == 1.0 and scored.loc["bigram", "precision"] == 1.0
    assert scored.loc["token id", "context_auroc"] == pytest.approx(0.5, abs=0.02)
    assert np.isnan(scored.loc["bigram", "context_auroc"])  # its role is fixed by its context: nothing beyond
    assert scored.loc["hidden state", "context_auroc"] > 0.95 and scored.loc["hidden state", "context_lift"] > 0.1
    assert scored.loc["token id", "context_lift"] == pytest.approx(0, abs=0.1)
    # the same on the fixed sampling design
    sampled = classes_of(features, roles, (ids, previous), sample_fraction=0.01)
    assert sampled["class"].drop("token id").to_dict() == {k: v for k, v in expected.items() if k != "token id"}


def test_shuffling_roles_within_contexts_keeps_a_surface_reader_and_fails_a_hidden_state_detector(corpus):
    ids, previous, roles = corpus
    features, _ = planted(ids, previous, roles)
    within = shuffle_within_contexts(roles, context_keys(ids, previous, 2), seed=1)
    assert sorted(within) == sorted(roles) and (within != roles).mean() > 0.05
    scored = classes_of(features, within, (ids, previous))
    assert scored.loc["pure token id", "class"] == "surface" and scored.loc["bigram", "class"] == "surface"
    assert scored.loc["hidden state", "class"] != "monosemantic" and scored.loc["one role", "class"] != "monosemantic"
    assert scored.loc["hidden state", "context_auroc"] == pytest.approx(0.5, abs=0.05)
    # a global shuffle fails both kinds: it only checks that roles are read at all
    globally = classes_of(features, np.random.default_rng(1).permutation(roles), (ids, previous))
    assert not globally["class"].isin(["monosemantic", "surface"]).any()


def test_without_token_contexts_the_public_call_classes_by_purity_alone(corpus):
    """``score_populations`` as called before the beyond-surface score: no tokens, no ``surface`` class."""
    ids, previous, roles = corpus
    features, expected = planted(ids, previous, roles)
    scored = score_populations({"planted": features}, roles, ROLE_FAMILY, k=50, mono=0.9, broad=0.9).set_index("feature")
    assert scored.loc["token id", "class"] == "monosemantic" and "surface" not in set(scored["class"])


def test_stratified_auroc_counts_pairs_inside_each_stratum_only():
    values = np.array([1.0, 0.0, 5.0, 4.0])  # stratum 0: the positive is higher; stratum 1: lower
    positive = np.array([True, False, False, True])
    strata = np.array([0, 0, 1, 1])
    auc, _, pairs = stratified_auroc(values, positive, strata)
    assert pairs == 2 and auc == 0.5  # a pooled AUROC would say 0.25
    auc, z, _ = stratified_auroc(np.r_[values[:2], 0.0, 1.0], positive, strata)
    assert auc == 1.0 and z > 0
    assert np.isnan(stratified_auroc(values, np.ones(4, bool), strata)[0])


def test_sampled_purity_does_not_grow_with_the_corpus_as_top_k_purity_does():
    """Top-50 purity rises as the corpus grows (its top is a smaller, more extreme tail); k tokens drawn from
    a fixed top fraction have the same expected purity at any size."""
    rng = np.random.default_rng(3)
    n = 80_000
    roles = np.where(rng.random(n) < 0.3, "r", "other")
    values = (rng.normal(size=(n, 40)) + 0.7 * (roles == "r")[:, None]).astype(np.float32)
    families = {"r": "x", "other": "y"}
    means = {}
    for size in (10_000, n):
        features = ArrayFeatures(values[:size], [f"f{i}" for i in range(40)])
        for design, fraction in (("top", None), ("sampled", 0.02)):
            scored = score_populations({"p": features}, roles[:size], families, k=50, sample_fraction=fraction)
            means[design, size] = scored["precision"].mean()
    assert means["top", n] - means["top", 10_000] > 0.02
    assert abs(means["sampled", n] - means["sampled", 10_000]) < 0.02


def test_signed_planted_features_share_units_in_the_intervals(corpus):
    ids, previous, roles = corpus
    features, _ = planted(ids, previous, roles)
    scored = score_populations({"planted": SignedFeatures(features)}, roles, ROLE_FAMILY, k=50, tokens=(ids, previous))
    shares = class_shares(scored, n_resamples=200).set_index("class")
    assert shares.loc["surface", "units"] == 7 and shares["share"].sum() == pytest.approx(1)
