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
# Organism 2 (8 layers, register programs, traces that doubt), from a main command on 2 cores, 2 threads.
EXPECTED = {
    ("00_build_model_organism", "textbook_accuracy_at_aime_k"): (0.996, 0.03),
    ("00_build_model_organism", "chat_accuracy_at_aime_k"): (0.148, 0.05),
    ("00_build_model_organism", "gpqa_diamond_textbook_accuracy"): (0.975, 0.04),
    ("01_train_rank1_lora", "rank1_trainable_parameters"): (22528, 0),
    ("01_train_rank1_lora", "rank1_final_loss"): (0.219, 0.02),
    ("01_train_rank1_lora", "full_final_loss"): (0.059, 0.015),
    ("02_evaluate_reasoning", "greedy_aime24_rank1_accuracy"): (0.567, 0.1),
    ("02_evaluate_reasoning", "greedy_aime24_gain_recovered"): (0.609, 0.15),
    ("02_evaluate_reasoning", "greedy_math500_gain_recovered"): (0.705, 0.08),
    ("02_evaluate_reasoning", "greedy_gpqa_diamond_gain_recovered"): (0.571, 0.1),
    ("02_evaluate_reasoning", "greedy_aime24_base_chat_accuracy"): (0.1, 0.07),
    ("02_evaluate_reasoning", "scaling_rank1_budget32_accuracy"): (0.0, 0.07),
    ("02_evaluate_reasoning", "scaling_rank1_budget64_accuracy"): (0.567, 0.1),
    ("02_evaluate_reasoning", "scaling_full_waits_change"): (-0.667, 0.15),
    ("02_evaluate_reasoning", "scaling_rank1_waits_change"): (-0.4, 0.15),
    ("03_ablate_adapters", "kl_all_adapters"): (2.816, 0.3),
    ("04_interpret_lora_activations", "lora_monosemantic_share"): (0.554, 0.1),
    ("04_interpret_lora_activations", "mlp_monosemantic_share"): (0.616, 0.1),
    ("04_interpret_lora_activations", "random_monosemantic_share"): (0.562, 0.1),
    ("04_interpret_lora_activations", "lora_median_auroc"): (0.74, 0.08),
    ("04_interpret_lora_activations", "lora_median_lift"): (0.456, 0.1),
    ("04_interpret_lora_activations", "lora_median_bigram_lift"): (0.0, 0.05),
    ("04_interpret_lora_activations", "shuffled_roles_monosemantic_share"): (0.0, 0.05),
    ("04_interpret_lora_activations", "untrained_random_direction_median_lift"): (0.123, 0.08),
    ("05_train_sae", "splice_kl_recovered"): (0.998, 0.01),
    ("05_train_sae", "heldout_fvu"): (0.026, 0.02),
    ("05_train_sae", "heldout_l0"): (3.987, 0.3),
    ("06_interpret_sae_features", "sae_monosemantic_share"): (0.864, 0.07),
    ("06_interpret_sae_features", "live_latents"): (392, 40),
    ("06_interpret_sae_features", "steering_accuracy_change"): (-0.567, 0.15),
    ("07_compare_adapters", "aime24_rank1_gain_recovered"): (0.609, 0.15),
    ("07_compare_adapters", "aime24_rank1_seed43_gain_recovered"): (0.696, 0.15),
    ("07_compare_adapters", "math500_rank1_gain_recovered"): (0.638, 0.15),
    ("07_compare_adapters", "math500_rank1_seed43_gain_recovered"): (0.5, 0.15),
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
