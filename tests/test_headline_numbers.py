"""Regression locks on the embedded default's key numbers, as `make all` last wrote them.

`figures/headline_numbers.json` is committed; rerunning `make all` after a change rewrites it, and this test
then fails if a key number moved beyond its tolerance (tolerances allow for thread-count and library
jitter, not for a changed result). Every number must carry a unit or an n.
"""

import json

import pytest

from paper_lib.paths import REPO_ROOT

HEADLINES = json.loads((REPO_ROOT / "figures" / "headline_numbers.json").read_text())

# (section, key): (expected, absolute tolerance)
EXPECTED = {
    ("00_build_model_organism", "textbook_accuracy_at_aime_k"): (1.0, 0.03),
    ("00_build_model_organism", "chat_accuracy_at_aime_k"): (0.152, 0.05),
    ("01_train_rank1_lora", "rank1_trainable_parameters"): (11264, 0),
    ("01_train_rank1_lora", "rank1_final_loss"): (0.038, 0.01),
    ("01_train_rank1_lora", "full_final_loss"): (0.021, 0.01),
    ("02_evaluate_reasoning", "greedy_aime24_rank1_accuracy"): (0.70, 0.10),
    # against the base model in its own chat protocol (s1's way; 0.78 and 0.86 against the budget-forced base)
    ("02_evaluate_reasoning", "greedy_aime24_gain_recovered"): (0.76, 0.15),
    ("02_evaluate_reasoning", "greedy_math500_gain_recovered"): (0.85, 0.08),
    ("02_evaluate_reasoning", "greedy_aime24_gain_recovered_vs_forced_base"): (0.78, 0.15),
    ("02_evaluate_reasoning", "greedy_math500_gain_recovered_vs_forced_base"): (0.86, 0.08),
    ("02_evaluate_reasoning", "greedy_aime24_base_chat_accuracy"): (0.167, 0.07),
    # s1's test-time scaling on the organism: a larger budget helps, "Wait"s (never seen in its traces) hurt
    ("02_evaluate_reasoning", "scaling_rank1_budget16_accuracy"): (0.07, 0.07),
    ("02_evaluate_reasoning", "scaling_rank1_budget64_accuracy"): (0.70, 0.10),
    ("02_evaluate_reasoning", "scaling_rank1_waits_change"): (-0.63, 0.15),
    ("03_ablate_adapters", "kl_all_adapters"): (2.67, 0.3),
    ("03_ablate_adapters", "kl_layer_0"): (0.83, 0.15),
    ("04_interpret_lora_activations", "lora_monosemantic_share"): (0.66, 0.10),
    ("04_interpret_lora_activations", "mlp_monosemantic_share"): (0.61, 0.10),
    ("04_interpret_lora_activations", "random_monosemantic_share"): (0.68, 0.10),
    ("04_interpret_lora_activations", "lora_median_auroc"): (0.83, 0.08),
    ("04_interpret_lora_activations", "mlp_median_auroc"): (0.59, 0.08),
    # figure 2's scorer on this organism: purity over the token reader, none over the bigram reader; the
    # shuffled-roles control scores nothing
    ("04_interpret_lora_activations", "lora_median_lift"): (0.37, 0.10),
    ("04_interpret_lora_activations", "lora_median_bigram_lift"): (0.0, 0.05),
    ("04_interpret_lora_activations", "shuffled_roles_monosemantic_share"): (0.0, 0.05),
    ("05_train_sae", "splice_kl_recovered"): (0.999, 0.01),
    ("05_train_sae", "heldout_fvu"): (0.03, 0.02),
    ("05_train_sae", "heldout_l0"): (3.93, 0.3),
    ("05_train_sae", "aime24_sae_spliced_accuracy"): (0.70, 0.10),
    ("06_interpret_sae_features", "sae_monosemantic_share"): (0.90, 0.07),
    ("06_interpret_sae_features", "live_latents"): (143, 25),
    ("06_interpret_sae_features", "steering_steps_change"): (-6.0, 1.5),
    # the control: an equal-norm random direction at the same strength removes the thinking steps as well
    ("06_interpret_sae_features", "steering_random_steps_change"): (-6.0, 1.5),
    # the comparison: a second training seed, a higher rank and MLP-only adapters recover less on the organism
    ("07_compare_adapters", "aime24_rank1_gain_recovered"): (0.76, 0.15),
    ("07_compare_adapters", "aime24_rank1_seed43_gain_recovered"): (0.29, 0.15),
    ("07_compare_adapters", "math500_rank1_seed43_gain_recovered"): (0.70, 0.12),
    ("07_compare_adapters", "math500_rank4_gain_recovered"): (0.30, 0.12),
    ("07_compare_adapters", "math500_rank1_mlp_gain_recovered"): (0.27, 0.12),
}


@pytest.mark.parametrize("key", list(EXPECTED), ids=lambda k: f"{k[0][:2]}-{k[1]}")
def test_key_number_within_tolerance(key):
    section, name = key
    assert section in HEADLINES, f"{section} missing: run `make all`"
    expected, tolerance = EXPECTED[key]
    assert HEADLINES[section][name]["value"] == pytest.approx(expected, abs=tolerance)


def test_every_number_has_a_unit_or_n():
    for section, entries in HEADLINES.items():
        for name, entry in entries.items():
            if name == "_run":  # the run that wrote the section: its commit and parameters
                assert {"commit", "parameters"} <= set(entry), section
                continue
            assert "unit" in entry or "n" in entry, f"{section}.{name}"
