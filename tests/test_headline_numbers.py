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
# 2026-12-05: the scorer of notebooks 04 and 06 counts a feature monosemantic only beyond the surface tokens,
# on a fixed sampling design (k of the top 1%), so those shares fell (e.g. LoRA 0.55 -> 0.06); the
# training-dependent numbers moved with the CPU they were computed on (the full fine-tune's MATH-like
# accuracy 0.806 on the machine of earlier runs, 0.884 on this one; both organisms' own weights identical).
EXPECTED = {
    ("00_build_model_organism", "textbook_accuracy_at_aime_k"): (0.996, 0.03),
    ("00_build_model_organism", "chat_accuracy_at_aime_k"): (0.148, 0.05),
    ("00_build_model_organism", "gpqa_diamond_textbook_accuracy"): (0.975, 0.04),
    ("01_train_rank1_lora", "rank1_trainable_parameters"): (22528, 0),
    ("01_train_rank1_lora", "rank1_final_loss"): (0.219, 0.02),
    ("01_train_rank1_lora", "full_final_loss"): (0.059, 0.015),
    ("02_evaluate_reasoning", "greedy_aime24_rank1_accuracy"): (0.567, 0.1),
    ("02_evaluate_reasoning", "greedy_aime24_gain_recovered"): (0.56, 0.15),
    ("02_evaluate_reasoning", "greedy_math500_gain_recovered"): (0.628, 0.08),
    ("02_evaluate_reasoning", "greedy_gpqa_diamond_gain_recovered"): (0.612, 0.1),
    ("02_evaluate_reasoning", "greedy_aime24_base_chat_accuracy"): (0.1, 0.07),
    ("02_evaluate_reasoning", "scaling_rank1_budget32_accuracy"): (0.0, 0.07),
    ("02_evaluate_reasoning", "scaling_rank1_budget64_accuracy"): (0.567, 0.1),
    ("02_evaluate_reasoning", "scaling_full_waits_change"): (-0.633, 0.15),
    ("02_evaluate_reasoning", "scaling_rank1_waits_change"): (-0.4, 0.15),
    ("03_ablate_adapters", "kl_all_adapters"): (2.816, 0.3),
    ("04_interpret_lora_activations", "lora_monosemantic_share"): (0.062, 0.05),
    ("04_interpret_lora_activations", "mlp_monosemantic_share"): (0.054, 0.05),
    ("04_interpret_lora_activations", "random_monosemantic_share"): (0.054, 0.05),
    ("04_interpret_lora_activations", "lora_median_auroc"): (0.732, 0.08),
    ("04_interpret_lora_activations", "lora_surface_share"): (0.071, 0.05),
    ("04_interpret_lora_activations", "lora_median_context_auroc"): (0.592, 0.05),
    ("04_interpret_lora_activations", "lora_vs_mlp_as_interpretable"): (0.009, 0.06),
    ("04_interpret_lora_activations", "lora_median_bigram_lift"): (0.0, 0.05),
    ("04_interpret_lora_activations", "control_shuffled_globally_monosemantic"): (0.0, 0.02),
    ("04_interpret_lora_activations", "control_shuffled_within_contexts_monosemantic"): (0.0, 0.02),
    ("04_interpret_lora_activations", "control_shuffled_within_contexts_surface"): (0.125, 0.06),
    ("04_interpret_lora_activations", "lora_monosemantic_share_at_250_traces"): (0.08, 0.05),
    ("04_interpret_lora_activations", "untrained_random_direction_monosemantic_share"): (0.018, 0.04),
    ("05_train_sae", "splice_kl_recovered"): (0.998, 0.01),
    ("05_train_sae", "heldout_fvu"): (0.026, 0.02),
    ("05_train_sae", "heldout_l0"): (3.987, 0.3),
    ("06_interpret_sae_features", "sae_monosemantic_share"): (0.113, 0.05),
    ("06_interpret_sae_features", "sae_surface_share"): (0.413, 0.07),
    ("06_interpret_sae_features", "live_latents"): (392, 40),
    ("06_interpret_sae_features", "steering_accuracy_change"): (-0.367, 0.15),
    ("07_compare_adapters", "aime24_rank1_gain_recovered"): (0.56, 0.15),
    ("07_compare_adapters", "aime24_rank1_seed43_gain_recovered"): (0.64, 0.15),
    ("07_compare_adapters", "math500_rank1_gain_recovered"): (0.597, 0.15),
    ("07_compare_adapters", "math500_rank1_seed43_gain_recovered"): (0.468, 0.15),
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


def test_no_figure_of_the_main_command_draws_a_label_over_another():
    """Each figure's labels are checked as it is saved (``plotting.overlapping_labels``: tick labels,
    titles, legend entries and slice labels whose drawn extents meet); the run records any clash."""
    clashes = {
        f"{section}/{name}": pairs
        for section, entries in HEADLINES.items()
        for name, pairs in entries.get("_run", {}).get("figure_overlaps", {}).items()
    }
    assert not clashes, clashes
