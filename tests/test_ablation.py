import pytest
import torch
from adapters import random_lora

from paper_lib.ablation import ablated, ablation_groups, ablation_kl, kl_divergence, summarize_kl
from paper_lib.data import completion_batches
from paper_lib.formats import ADAPTER_MODULES


@pytest.fixture(scope="module")
def peft_model(organism):
    model, tok, _ = organism
    return random_lora(model), tok


def test_ablating_every_adapter_gives_the_base_model_and_is_undone(peft_model):
    model, tok = peft_model
    batch = tok(["<|im_start|>user\n3 x2 +1<|im_end|>\n<|im_start|>assistant\n"], return_tensors="pt")
    with torch.no_grad():
        full = model(**batch).logits
        with model.disable_adapter():
            base = model(**batch).logits
        keys = ablation_groups(model)["all"]["all adapters"]
        with ablated(model, keys):
            off = model(**batch).logits
        again = model(**batch).logits
    assert torch.allclose(off, base, atol=1e-6) and not torch.allclose(full, base, atol=1e-3)
    assert torch.equal(again, full)
    with pytest.raises(KeyError):
        with ablated(model, [(99, "q_proj")]):
            pass


def test_groups_cover_the_paper_families(peft_model):
    groups = ablation_groups(peft_model[0])
    n = peft_model[0].config.num_hidden_layers
    assert len(groups["layer"]) == n and len(groups["single"]) == 7 * n
    assert len(groups["kind"]["attention"]) == 4 * n and len(groups["kind"]["mlp"]) == 3 * n


def test_kl_is_zero_for_identical_and_positive_otherwise():
    logits = torch.randn(2, 5, 11)
    assert torch.allclose(kl_divergence(logits, logits), torch.zeros(2, 5), atol=1e-6)
    assert (kl_divergence(logits, torch.randn(2, 5, 11)) > 0).all()


def test_completion_scoring_masks_the_prompt(peft_model):
    model, tok = peft_model
    [batch] = completion_batches(tok, ["ab", "abcd"], ["xyz", "x"], batch_size=2)
    assert batch["score_mask"][0].tolist()[:5] == [0, 1, 1, 1, 0]  # positions 1-3 predict x, y, z
    assert batch["score_mask"][1].tolist() == [0, 0, 0, 1, 0]
    per_trace = ablation_kl(model, [batch], {"layer 0": ablation_groups(model)["layer"]["layer 0"]})
    summary = summarize_kl(per_trace, n_resamples=50)
    assert len(per_trace) == 2 and (per_trace["kl"] >= 0).all() and summary.loc[0, "n"] == 2


def test_adapter_subsets_act_only_through_the_kept_modules(peft_model, organism, tmp_path):
    from peft import PeftModel

    from paper_lib.ablation import save_adapter_subset
    from paper_lib.formats import ATTENTION_MODULES, MLP_MODULES

    model, tok = peft_model
    model.save_pretrained(tmp_path / "full")
    base = organism[0]
    save_adapter_subset(tmp_path / "full", tmp_path / "mlp", MLP_MODULES)
    batch = tok(["<|im_start|>user\n3 x2 +1<|im_end|>\n<|im_start|>assistant\n"], return_tensors="pt")
    with torch.no_grad():
        with ablated(model, ablation_groups(model)["kind"]["attention"]):
            expected = model(**batch).logits
        import copy

        mlp_only = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "mlp").eval()
        assert torch.allclose(mlp_only(**batch).logits, expected, atol=1e-5)
    with pytest.raises(ValueError, match="unknown modules"):
        save_adapter_subset(tmp_path / "full", tmp_path / "bad", ("qkv",))
    assert set(ATTENTION_MODULES) | set(MLP_MODULES) == set(ADAPTER_MODULES)


def test_chunked_kl_from_hidden_states_equals_kl_of_full_logits(peft_model):
    """Logits only for scored positions, a few at a time, give the full-logit KL."""
    model, tok = peft_model
    [batch] = completion_batches(tok, ["ab", "abcd", "a"], ["xyz" * 5, "x", "yy"], batch_size=3)
    mask = batch["score_mask"].bool()
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    keys = ablation_groups(model)["layer"]["layer 1"]
    with torch.no_grad():
        full = model(**inputs).logits
        with ablated(model, keys):
            kl = kl_divergence(full, model(**inputs).logits)
    expected = ((kl * mask).sum(1) / mask.sum(1)).tolist()
    per_trace = ablation_kl(model, [batch], {"layer 1": keys}, chunk_elements=3 * model.config.vocab_size)
    # float32 rounding differs with the matmul shape (3 positions at a time vs all): ~1e-6 on KLs of ~0.06
    assert per_trace["kl"].tolist() == pytest.approx(expected, rel=1e-4, abs=1e-6)


def test_batches_sized_by_tokens_keep_order_and_bound_padded_tokens(peft_model):
    _, tok = peft_model
    prompts = ["q"] * 6
    completions = ["x" * n for n in (5, 40, 3, 3, 30, 2)]
    batches = completion_batches(tok, prompts, completions, batch_size=32, batch_tokens=64)
    assert all(b["input_ids"].numel() <= 64 for b in batches)
    decoded = [tok.decode(row[m.bool()]) for b in batches for row, m in zip(b["input_ids"], b["attention_mask"])]
    assert decoded == [p + c for p, c in zip(prompts, completions)]
    assert len(completion_batches(tok, prompts, completions, batch_size=32)) == 1  # no token cap: one batch


def test_splice_traces_can_be_drawn_only_from_held_out_documents(organism_dir):
    """At real scale the splice's traces come from the same dataset as the SAE's: only held-out rows."""
    from paper_lib.data import load_traces, scoring_traces

    traces = load_traces(str(organism_dir / "s1K-1.1"))
    held_out = range(990, 1000)
    rows = scoring_traces(str(organism_dir / "s1K-1.1"), 4, seed=1, among=held_out)
    questions = {traces[i]["question"] for i in held_out}
    assert len(rows) == 4 and all(r["question"] in questions for r in rows)
    with pytest.raises(ValueError, match="has 1000 rows"):
        scoring_traces(str(organism_dir / "s1K-1.1"), 4, among=[1000])


def test_claim_statistics_are_the_group_means_they_name():
    import pandas as pd

    from paper_lib.ablation import later_layers_margin, module_margin, single_adapter_ratio, trace_statistic

    rows = []
    for trace in range(20):
        for layer in range(6):
            rows.append({"group": f"layer {layer}", "trace": trace, "kl": 0.1 * layer + 0.01 * trace})
            for module, kl in (("q_proj", 1.0), ("gate_proj", 3.0), ("down_proj", 2.0)):
                rows.append({"group": f"{layer}/{module}", "trace": trace, "kl": kl * (1 + layer)})
    per_trace = pd.DataFrame(rows)
    value, lo, hi = trace_statistic(per_trace, later_layers_margin, 200)
    assert value == pytest.approx((0.4 + 0.5) / 2 - (0.2 + 0.3) / 2) and lo <= value <= hi
    assert trace_statistic(per_trace, single_adapter_ratio, 200)[0] == pytest.approx(2.5)
    assert trace_statistic(per_trace, module_margin("gate_proj"), 200)[0] == pytest.approx(3.5)  # 10.5 - 7


def test_an_ablation_starts_at_its_first_layer_and_gives_what_the_whole_forward_gives(peft_model):
    """Layers below a group's first ablated layer are not run again (their output is the reference's), and
    the KL is bit for bit that of ablating in a whole forward pass."""
    from paper_lib.ablation import split_head, trace_means

    model, tok = peft_model
    [batch] = completion_batches(tok, ["3 x2 +1", "12 x3"], [" think 7 then 36", " 5"], batch_size=2)
    families = ablation_groups(model)
    groups = {"layer 3": families["layer"]["layer 3"], "5/down_proj": families["single"]["5/down_proj"]}
    groups["attention"] = families["kind"]["attention"]
    decoder, head = split_head(model)
    calls = []
    hook = decoder.layers[0].register_forward_hook(lambda *_: calls.append(1))
    try:
        per_trace = ablation_kl(model, [batch], groups)
    finally:
        hook.remove()
    assert len(calls) == 2  # the reference pass and the attention group (it starts at layer 0)
    mask = batch["score_mask"].bool()
    with torch.no_grad():
        reference = decoder(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state[mask]
        for name, keys in groups.items():
            with ablated(model, keys):
                hidden = decoder(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state[mask]
            whole = trace_means(kl_divergence(head(reference), head(hidden)), mask).tolist()
            assert per_trace[per_trace.group == name]["kl"].tolist() == whole, name
    assert (per_trace["kl"] > 0).all()
