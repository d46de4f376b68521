"""Top-k, context windows, token roles and the role scorer."""

import random

import numpy as np
import pandas as pd
import pytest

from paper_lib.activations import write_activation_store
from paper_lib.interp import (
    RARE,
    ArrayFeatures,
    SignedFeatures,
    auroc,
    auroc_from_histograms,
    class_shares,
    classify_features,
    compare_populations,
    feature_examples,
    ordered_keys,
    score_against_roles,
    score_populations,
    top_features,
    top_k_indices,
    top_k_streaming,
)


def test_top_k_equals_a_brute_force_sort_and_streams_exactly():
    rng = np.random.default_rng(0)
    values = rng.normal(size=(5000, 9)).astype(np.float32)
    brute = np.argsort(-values, axis=0, kind="stable")[:37].T
    v, i = top_k_indices(values, 37)
    assert np.array_equal(i, brute) and np.array_equal(v, np.take_along_axis(values.T, brute, 1))
    for chunks in (np.array_split(values, 11), [values[:3], values[3:]]):
        sv, si = top_k_streaming(chunks, 37)
        assert np.array_equal(si, brute) and np.array_equal(sv, v)
    ties = np.zeros((10, 1), np.float32)
    assert top_k_indices(ties, 3)[1].tolist() == [[0, 1, 2]]  # ties: lower index first
    coarse = rng.integers(0, 4, size=(3000, 40)).astype(np.float16)  # many ties at the k-th place
    stable = np.argsort(-coarse.astype(np.float32), axis=0, kind="stable")[:25].T
    assert np.array_equal(top_k_indices(coarse, 25, block=7)[1], stable)
    assert np.array_equal(top_k_streaming(np.array_split(coarse, 9), 25)[1], stable)
    assert top_k_indices(values[:4], 10)[1].shape == (9, 4)


def test_signed_features_and_context_windows_stay_in_the_document(tmp_path):
    signed = SignedFeatures(ArrayFeatures(np.array([[1.0, -2.0]]), ["a", "b"]))
    assert signed.names == ["a+", "b+", "a-", "b-"] and np.concatenate(list(signed.blocks())).tolist() == [[1.0, -2.0, -1.0, 2.0]]
    # three documents of 3, 4 and 1 tokens (token id = global index), in two shards
    docs = [np.arange(0, 3), np.arange(3, 7), np.arange(7, 8)]
    store = write_activation_store(
        tmp_path / "s", [(ids, np.zeros((len(ids), 1, 1))) for ids in docs], [0], ["q_proj"], docs_per_shard=2
    )
    assert store.context(3, 2) == (3, 6) and store.context(2, 5) == (0, 3) and store.context(7, 1) == (7, 8)
    assert [store.document_of(i) for i in (0, 2, 3, 6, 7)] == [0, 0, 1, 1, 2]
    features = ArrayFeatures(np.arange(8.0)[:, None] - 5, ["f"])
    feats = feature_examples(features, store, str, top_features(features, 4), k=4, width=1)
    ex = feats[0]["examples"]
    assert [e["value"] for e in ex] == [2.0, 1.0]  # only values above 0
    assert ex[0]["tokens"] == ["7"] and ex[1]["tokens"] == ["5", "6"] and ex[1]["center"] == 1 and ex[1]["doc"] == 1
    assert ex[1]["values"] == [0.0, 1.0]


def test_streamed_role_scores_equal_the_dense_ones_for_every_block_size_and_histogram_budget():
    """AUROC from float16 histograms equals the rank-based AUROC on the float16 values (ties half)."""
    from paper_lib.interp import auroc as dense_auroc

    rng = np.random.default_rng(1)
    roles = rng.choice(["a", "b", "c", "d"], size=3001)
    values = (rng.normal(size=(3001, 6)) + (roles == "b")[:, None] * np.arange(6)).astype(np.float16)
    values[:, 5] = np.round(values[:, 5])  # heavy ties
    values[::7, 4] = -0.0  # signed zeros tie with +0
    values[::11, 4] = 0.0
    families = {"a": "x", "b": "x", "c": "y", "d": "y"}
    expected = None
    for block, budget in ((5000, 2**28), (64, 2**20), (1, 2**20)):
        scores = score_against_roles(
            SignedFeatures(ArrayFeatures(values, list("uvwxyz"), block=block)), roles, families, k=40, histogram_bytes=budget
        )
        if expected is None:
            expected = scores
            signed = np.concatenate([values, -values], axis=1).astype(np.float32)
            for f, row in scores.iterrows():
                assert row.auroc == pytest.approx(dense_auroc(signed[:, f], roles == row.role), abs=1e-12)
        pd.testing.assert_frame_equal(scores, expected)
    keys = ordered_keys(np.array([-np.inf, -2.0, -1e-5, -0.0, 0.0, 1e-5, 3.0, np.inf]))
    assert (np.diff(keys) >= 0).all() and keys[3] == keys[4] and len(set(keys.tolist())) == 7
    assert auroc_from_histograms(np.array([0, 1]), np.array([1, 1])) == 1.0
    with pytest.raises(ValueError, match="roles must cover every token"):
        score_against_roles(ArrayFeatures(values, list("uvwxyz")), roles[:-5], families, k=10)


def test_auroc_and_role_scores():
    assert auroc(np.array([0.1, 0.9, 0.8, 0.2]), np.array([0, 1, 1, 0])) == 1.0
    assert auroc(np.array([1.0, 1.0]), np.array([1, 0])) == 0.5
    roles = np.array(["digit", "op", "digit", "op", "space", "digit"] * 50)
    families = {"digit": "values", "op": "ops", "space": "syntax"}
    pure = (roles == "digit").astype(float) + np.linspace(0, 0.1, len(roles))
    mixed = np.isin(roles, ["digit", "op"]).astype(float)
    noise = np.random.default_rng(0).normal(size=len(roles))
    scores = score_against_roles(
        ArrayFeatures(np.stack([pure, mixed, noise], 1), ["pure", "mixed", "noise"]), roles, families | {"op": "values"}, k=20
    )
    assert scores.loc[0, "role"] == "digit" and scores.loc[0, "precision"] == 1.0 and scores.loc[0, "auroc"] == 1.0
    assert scores.loc[1, "precision"] < 0.9 and scores.loc[1, "family_precision"] == 1.0
    classes = classify_features(scores, mono=0.9, broad=0.9)
    assert classes.tolist()[:2] == ["monosemantic", "broad"] and classes[2] in ("broad", "polysemantic")


def test_a_sparse_feature_is_scored_on_the_tokens_where_it_fires_and_a_rare_one_is_left_unclassified():
    """A latent that fires on 6 "digit" tokens is pure there: its top 20 are not padded with 14 zero-valued
    tokens (which made it look polysemantic); one that fires on 2 is ``rare``, out of the shares."""
    roles = np.array(["digit", "op", "space", "op"] * 30)
    sparse, rare, dense = np.zeros(len(roles)), np.zeros(len(roles)), np.linspace(1, 2, len(roles))
    sparse[np.flatnonzero(roles == "digit")[:6]] = np.arange(1, 7)
    rare[[0, 4]] = 1.0
    features = ArrayFeatures(np.stack([sparse, rare, dense], 1), ["sparse", "rare", "dense"])
    families = {"digit": "values", "op": "ops", "space": "syntax"}
    scored = score_populations({"SAE": features}, roles, families, k=20, min_active=4)
    assert scored["n_active"].tolist() == [6, 2, 20]
    assert scored.loc[0, "precision"] == 1.0 and scored.loc[0, "class"] == "monosemantic"
    assert scored.loc[1, "class"] == RARE and scored.loc[2, "class"] != RARE
    shares = class_shares(scored, n_resamples=200)
    assert shares["n"].eq(2).all() and shares["rare"].eq(1).all() and shares["share"].sum() == pytest.approx(1)
    silent = score_against_roles(ArrayFeatures(np.zeros((len(roles), 1)), ["silent"]), roles, families, k=20)
    assert silent.loc[0, "n_active"] == 0 and np.isnan(silent.loc[0, "precision"])


def test_class_shares_and_population_tests():
    scored = pd.DataFrame(
        {
            "population": ["a"] * 40 + ["b"] * 40,
            "class": ["monosemantic"] * 30 + ["polysemantic"] * 10 + ["monosemantic"] * 10 + ["polysemantic"] * 30,
            "precision": [1.0] * 30 + [0.3] * 10 + [1.0] * 10 + [0.3] * 30,
            "auroc": [0.9] * 40 + [0.6] * 40,
        }
    )
    shares = class_shares(scored, n_resamples=500)
    a = shares[(shares.population == "a") & (shares["class"] == "monosemantic")].iloc[0]
    assert a.share == 0.75 and a.lo < 0.75 < a.hi and shares.groupby("population").share.sum().round(6).eq(1).all()
    test = compare_populations(scored, "a", "b", n_resamples=500)
    assert test["chi2_p"] < 1e-3 and test["precision_diff"] == pytest.approx(0.35) and test["precision_diff_lo"] > 0
    assert test["auroc_diff"] == pytest.approx(0.3)


def test_token_roles_of_an_organism_trace(organism):
    from paper_lib.data import format_s1_text
    from paper_lib.organism import ROLES, ChainTask, character_roles, sample_problem, token_roles, trace_row

    _, tok, _ = organism
    row = trace_row(sample_problem(random.Random(0), 7), ChainTask(), random.Random(0))  # organism 1's trace
    text = format_s1_text(tok, row)
    roles = token_roles(tok, text)
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert len(roles) == len(ids) and set(roles) <= set(ROLES) and "other" not in roles
    pairs = [(tok.decode([i]), r) for i, r in zip(ids, roles)]
    think = pairs.index(("t", "think_marker"))
    assert [r for _, r in pairs[think + 6 : think + 12]] == [
        "step_input",
        "step_operator",
        "step_operand",
        "step_equals",
        "step_result",
        "step_separator",
    ]
    assert pairs[-3] == (row["deepseek_attempt"], "final_answer") and pairs[-2][1] == "chat_marker"
    mc = "<|im_start|>user\n1 +1\n(A) 2 (B) 5<|im_end|>\n<|im_start|>assistant\n<|im_start|>think\n1+1=2;2?A2\n"
    labels = dict(zip(range(len(mc)), character_roles(mc)))
    assert labels[mc.index("(A)") + 1] == "option_letter" and labels[mc.index("?")] == "scan_mark"
    assert labels[mc.index("?A2") + 1] == "scan_letter" and labels[mc.index("?A2") + 2] == "scan_option_value"
    assert token_roles(tok, text, max_length=10) == roles[:10]
    forced = character_roles("<|im_start|>answer\nFinal Answer: 7")  # budget forcing's wording
    assert forced[-1] == "final_answer" and forced[-9] == "answer_prefix"


def test_lift_over_token_identity_and_bigram_separates_role_readers_from_token_readers():
    """Token 7 is a 'result' after '=' and an 'input' elsewhere: a feature that reads the token alone scores
    pure on a role but lifts nothing over the token (or bigram) reader; one that reads the hidden role lifts
    over the token reader, and nothing over the bigram reader once the previous token decides the role."""
    rng = np.random.default_rng(0)
    n = 4000
    ids = rng.integers(0, 5, n)
    ids[::3] = 7
    previous = np.concatenate([[-1], ids[:-1]])
    roles = np.where(ids == 7, np.where(previous == 3, "result", "input"), "other")
    token_reader = (ids == 7).astype(np.float32) + rng.normal(0, 0.01, n).astype(np.float32)
    role_reader = (roles == "result").astype(np.float32) + rng.normal(0, 0.01, n).astype(np.float32)
    features = ArrayFeatures(np.stack([token_reader, role_reader], 1), ["token", "role"], block=999)
    families = {"result": "values", "input": "values", "other": "other"}
    scored = score_against_roles(features, roles, families, k=50, tokens=(ids, previous), quantile_top=0.04)
    scored = scored.set_index("feature")
    assert scored.loc["token", "role"] == "input" and scored.loc["token", "lift"] == pytest.approx(0, abs=0.1)
    assert scored.loc["role", "precision"] == 1.0 and scored.loc["role", "identity_precision"] < 0.4
    assert scored.loc["role", "lift"] > 0.6 and scored.loc["role", "bigram_lift"] == pytest.approx(0, abs=1e-9)
    # detection across quantiles: the role reader's top 4% (fewer than the role's ~4.5%) is the role in every
    # bin; the token reader's mixes the two roles of token 7 in every bin
    assert scored.loc["role", "quantile_precision"] == pytest.approx([1.0] * 5)
    assert max(scored.loc["token", "quantile_precision"]) < 0.9
    with pytest.raises(ValueError, match="token ids"):
        score_against_roles(features, roles, families, tokens=(ids[:10], previous))


def test_quantile_precision_bins_the_activating_tokens_by_count():
    from paper_lib.interp import quantile_precision

    values = np.arange(1, 101, dtype=np.float32)  # 100 activating tokens, 900 at zero
    values = np.concatenate([values, np.zeros(900, np.float32)])
    positive = values > 80  # the top fifth of the activating tokens is the role, nothing below
    keys = ordered_keys(values)
    total, pos = np.bincount(keys, minlength=65536), np.bincount(keys[positive], minlength=65536)
    assert quantile_precision(pos, total, quantiles=5, top=0.1) == pytest.approx([0.0, 0.0, 0.0, 0.0, 1.0])
    assert quantile_precision(pos, total, quantiles=2, top=0.04) == pytest.approx([0.0, 1.0])  # the top 40 only
    assert np.isnan(quantile_precision(pos * 0, total * 0, quantiles=3)).all()


def test_intervals_resample_an_adapters_two_polarities_together():
    """Duplicating every feature (as a perfectly dependent second polarity) must not narrow the interval when
    the copies are one unit; counted as independent features it would."""
    rng = np.random.default_rng(1)
    classes = rng.choice(["monosemantic", "broad", "polysemantic"], 60)
    one = pd.DataFrame({"population": "LoRA", "class": classes})
    doubled = pd.DataFrame({"population": "LoRA", "class": np.repeat(classes, 2), "unit": np.repeat(np.arange(60), 2)})
    a = class_shares(one).set_index("class")
    b = class_shares(doubled).set_index("class")
    naive = class_shares(doubled.drop(columns="unit")).set_index("class")
    assert np.allclose(a["share"], b["share"]) and (b["units"] == 60).all() and (b["n"] == 120).all()
    assert np.allclose(a["hi"] - a["lo"], b["hi"] - b["lo"], atol=0.03)
    present = b["share"] > 0  # (no feature of this test is "surface")
    assert ((naive["hi"] - naive["lo"]) < (b["hi"] - b["lo"]) - 0.02)[present].all()


def test_adjusted_p_values_are_benjamini_hochberg():
    from paper_lib.interp import adjusted_p_values

    adjusted = adjusted_p_values({"a": 0.01, "b": 0.04, "c": 0.03, "d": 0.5})
    assert adjusted == pytest.approx({"a": 0.04, "b": 0.16 / 3, "c": 0.16 / 3, "d": 0.5})


def test_token_contexts_start_each_document_afresh(tmp_path):
    from paper_lib.activations import ActivationStore

    docs = [np.array([5, 6, 7]), np.array([8, 9]), np.array([4])]
    write_activation_store(tmp_path / "s", [(d, np.zeros((len(d), 1, 1))) for d in docs], [0], ["q_proj"], docs_per_shard=2)
    ids, previous = ActivationStore(tmp_path / "s").token_contexts()
    assert ids.tolist() == [5, 6, 7, 8, 9, 4] and previous.tolist() == [-1, 5, 6, -1, 8, -1]


def test_scored_units_pair_the_two_polarities_of_a_read_out():
    """``class_shares`` resamples units: a signed population's two polarities share one, any other feature
    is its own."""
    from paper_lib.interp import score_populations

    values = np.random.default_rng(0).normal(size=(300, 2)).astype(np.float32)
    roles = np.where(np.arange(300) % 2 == 0, "even", "odd")
    plain = ArrayFeatures(values, ["n1", "n2"])
    scored = score_populations({"signed": SignedFeatures(plain), "plain": plain}, roles, {"even": "x", "odd": "x"}, k=10)
    assert scored.set_index("feature").loc[["n1+", "n1-", "n2+", "n2-"], "unit"].tolist() == ["n1", "n1", "n2", "n2"]
    assert scored[scored.population == "plain"]["unit"].tolist() == ["n1", "n2"]
