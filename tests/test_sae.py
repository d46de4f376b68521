"""The SAE module: planted-dictionary recovery through sae-lens, batch-independent inference, the splice."""

import dataclasses

import numpy as np
import pandas as pd
import pytest
import torch

from paper_lib.activations import transformed_forward, write_activation_store
from paper_lib.config import ConfigError
from paper_lib.engines import ScalarEngine
from paper_lib.formats import ADAPTER_MODULES
from paper_lib.sae import (
    SAESpec,
    encode,
    load_sae,
    reconstruct,
    sae_metrics,
    shard_batches,
    store_matrix,
    train_sae,
)


def planted_store(path, n_tokens=60000, n_features=40, seed=0):
    rng = np.random.default_rng(seed)
    dictionary = rng.normal(size=(n_features, 28))
    dictionary /= np.linalg.norm(dictionary, axis=1, keepdims=True)
    codes = (rng.random((n_tokens, n_features)) < 3 / n_features) * rng.exponential(1.0, (n_tokens, n_features))
    acts = (codes @ dictionary).astype(np.float32).reshape(n_tokens, 4, 7)
    docs = [(np.arange(100, dtype=np.int32), acts[i : i + 100]) for i in range(0, n_tokens, 100)]
    return write_activation_store(path, docs, [0, 1, 2, 3], list(ADAPTER_MODULES), dtype="float32"), dictionary


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    root = tmp_path_factory.mktemp("planted")
    store, dictionary = planted_store(root / "store")
    spec = SAESpec(expansion=2, k=3, lr=3e-3, batch_size=256, epochs=10, dead_tokens=10000, normalize="none")
    history = train_sae(store, spec, root / "sae")
    return store, dictionary, history, root / "sae"


def test_recovers_a_planted_sparse_dictionary(planted):
    store, dictionary, history, out = planted
    sae, scales = load_sae(out)
    decoder = sae.W_dec.detach().numpy()
    decoder = decoder / np.linalg.norm(decoder, axis=1, keepdims=True)
    best = np.abs(dictionary @ decoder.T).max(axis=1)
    assert best.mean() >= 0.95, best
    metrics = sae_metrics(sae, scales, store_matrix(store))
    assert metrics["fvu"] < 0.1 and 2 <= metrics["l0"] <= 4 and 0 <= metrics["dead_fraction"] < 0.5
    assert list(history.columns) == ["step", "loss", "mse", "aux", "fvu", "l0", "dead"]
    assert history.fvu.iloc[-50:].mean() < history.fvu.iloc[:10].mean() / 3  # it learned
    assert SAESpec.load(out) == SAESpec(expansion=2, k=3, lr=3e-3, batch_size=256, epochs=10, dead_tokens=10000, normalize="none")


def test_inference_is_per_token_and_normalisation_is_undone(planted, tmp_path):
    store, _, _, out = planted
    sae, scales = load_sae(out)
    x = torch.from_numpy(store_matrix(store)[:500])
    alone = torch.cat([encode(sae, scales, x[i : i + 1]) for i in range(0, 500, 50)])
    together = encode(sae, scales, x)[::50]
    assert torch.equal(alone > 0, together > 0) and torch.allclose(alone, together, atol=1e-5)
    scaled = torch.full_like(scales, 3.0)
    assert torch.allclose(reconstruct(sae, scaled, x * 3), reconstruct(sae, scales, x) * 3, atol=1e-5)


def test_batches_stream_the_chosen_documents_only(tmp_path):
    store, _ = planted_store(tmp_path / "s", n_tokens=2000)
    scales = np.full(28, 2.0, dtype=np.float32)
    stream = shard_batches(store, 64, scales, seed=1, docs=range(5))
    seen = torch.cat([next(stream) for _ in range(20)])  # 1,280 rows from 500 tokens: several passes
    allowed = store_matrix(store, range(5)) / 2
    assert seen.shape == (1280, 28)
    assert all(np.isclose(allowed, row.numpy(), atol=1e-6).all(1).any() for row in seen[:50])


def test_spec_validation_and_missing_sae(tmp_path):
    with pytest.raises(ConfigError, match="normalize"):
        SAESpec(normalize="layer")
    with pytest.raises(ConfigError, match="dead_tokens"):
        SAESpec(dead_tokens=10)
    with pytest.raises(FileNotFoundError, match="notebook 05"):
        load_sae(tmp_path)


def test_splice_with_identity_and_zero_matches_the_model_and_the_ablation(organism):
    import copy

    from peft import get_peft_model

    from paper_lib.ablation import ablated
    from paper_lib.activations import find_adapters
    from paper_lib.organism import Problem, textbook_document
    from paper_lib.training import LoraSpec, build_lora_config

    base, tok, _ = organism
    model = get_peft_model(copy.deepcopy(base), build_lora_config(LoraSpec(), base.config))
    torch.manual_seed(0)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            p.data.normal_(0, 0.05)
    model.eval()
    batch = tok(
        [textbook_document(Problem(3, ("x2", "+1"))), "<|im_start|>user\n5 +2<|im_end|>\n"], return_tensors="pt", padding=True
    )
    with torch.no_grad():
        full = model(**batch).logits
        same = transformed_forward(model, lambda s: s, **batch).logits
        zero = transformed_forward(model, torch.zeros_like, **batch).logits
        with ablated(model, list(find_adapters(model))):
            none = model(**batch).logits
    assert (same - full).abs().max() < 1e-5 and (zero - none).abs().max() < 1e-5 and (full - none).abs().max() > 1e-2
    # generation: the identity transform gives HF generate's greedy tokens
    prompts = [
        tok.apply_chat_template([{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True)
        for q in ("3 x2 +1", "7 +2 +2 x3", "1 x3")
    ]
    engine = ScalarEngine(model, tok, {"same": lambda s: s})
    stops = [tok.convert_tokens_to_ids(t) for t in ("<|im_end|>", "<|endoftext|>")]
    ours = engine.generate(prompts, 12, lambda s: s, stops=stops)
    tok.padding_side = "left"
    enc = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    with torch.no_grad():
        ref = model.generate(**enc, max_new_tokens=12, do_sample=False, eos_token_id=stops, pad_token_id=tok.pad_token_id)
    ref = [
        row[: next((i + 1 for i, t in enumerate(row) if t in stops), len(row))]
        for row in ref[:, enc["input_ids"].shape[1] :].tolist()
    ]
    assert ours == ref and all(row[-1] in stops for row in ours)


def test_the_saved_sae_reads_raw_adapter_scalars_with_sae_lens_alone(tmp_path):
    """The per-adapter input scaling is folded into the saved weights: sae-lens alone, fed the raw
    scalars in the stored layout, gives the latents the notebooks use, and its metadata says what it reads."""
    from sae_lens import SAE

    rng = np.random.default_rng(1)
    unequal = np.array([0.01, 0.1, 1.0, 10.0, 3.0, 0.3, 30.0], dtype=np.float32)  # adapters of very different size
    docs = [(np.arange(100, dtype=np.int32), (rng.normal(size=(100, 2, 7)) * unequal).astype(np.float32)) for _ in range(40)]
    store = write_activation_store(tmp_path / "store", docs, [0, 1], list(ADAPTER_MODULES), dtype="float32")
    train_sae(store, SAESpec(expansion=2, k=3, batch_size=200, epochs=2, dead_tokens=1000), tmp_path / "sae")
    alone = SAE.load_from_disk(str(tmp_path / "sae" / "sae"))
    sae, scales = load_sae(tmp_path / "sae")
    raw = torch.from_numpy(store_matrix(store)[:2000])
    ours = encode(sae, scales, raw)
    theirs = alone.encode(raw)
    assert torch.allclose(theirs, ours, atol=1e-4, rtol=1e-4)
    assert ((theirs > 0) == (ours > 0)).float().mean() > 0.999
    assert torch.allclose(alone.decode(theirs), reconstruct(sae, scales, raw), atol=1e-3, rtol=1e-3)
    meta = alone.cfg.metadata
    assert meta["modules"] == list(ADAPTER_MODULES) and meta["layers"] == [0, 1] and meta["layout"].startswith("layer-major")
    assert meta["traces"] == store.meta.get("texts") and "raw adapter scalars" in meta["input_scaling"]


def test_splice_kl_with_an_identity_state_is_zero_and_without_the_adapter_equals_the_ablation(organism, monkeypatch):
    from adapters import random_lora

    import paper_lib.sae as sae_module
    from paper_lib.ablation import ablation_groups, ablation_kl
    from paper_lib.data import completion_batches
    from paper_lib.sae import splice_kl

    base, tok, _ = organism
    model = random_lora(base)
    monkeypatch.setattr(sae_module, "state_transform", lambda sae, scales: lambda scalars: scalars)
    batches = completion_batches(tok, ["3 +1\n", "4 x2 +2\n"], ["think\n3+1=4", "think\n4x2=8\n8+2=0"], batch_size=2)
    per_trace = splice_kl(model, batches, sae=None, scales=None)
    assert per_trace.kl_spliced.abs().max() < 1e-5 and (per_trace.kl_no_adapter > 1e-3).all()
    ablation = ablation_kl(model, batches, ablation_groups(model)["all"])
    assert per_trace.kl_no_adapter.tolist() == pytest.approx(ablation.kl.tolist(), rel=1e-4)


def test_latents_metrics_and_summaries_stream_block_by_block_like_the_dense_arrays(planted):
    """Notebooks 05 and 06 read the store block by block: the streamed held-out metrics, latents and
    per-latent summaries equal the same computed on the whole matrix at once."""
    from paper_lib.interp import ArrayFeatures, top_k_indices
    from paper_lib.sae import LatentFeatures, latent_summary

    store, _, _, out = planted
    sae, scales = load_sae(out)
    dense = store_matrix(store, range(500, 600))
    whole = sae_metrics(sae, scales, dense)
    streamed = sae_metrics(sae, scales, lambda: store.blocks(docs=range(500, 600), block_tokens=999))
    assert whole.pop("tokens") == streamed.pop("tokens") == 10000
    assert np.array_equal(whole.pop("fired"), streamed.pop("fired"))
    assert streamed == pytest.approx(whole, rel=1e-5)
    z = encode(sae, scales, torch.from_numpy(store_matrix(store))).numpy()
    live = np.flatnonzero((z > 0).any(0))
    features = LatentFeatures(sae, scales, store.features(block_tokens=4096), columns=live)
    assert np.allclose(np.concatenate(list(features.blocks())), z[:, live], atol=1e-6)
    assert np.allclose(features.rows(120, 180), z[120:180, live], atol=1e-6)
    summary = latent_summary(sae, scales, ArrayFeatures(store_matrix(store), ["x"] * 28, block=3000), k=7)
    assert np.array_equal(summary["fired"], (z > 0).sum(0)) and np.allclose(summary["mass"], z.sum(0), rtol=1e-5)
    assert np.array_equal(summary["top_indices"][live], top_k_indices(z, 7)[1][live])


def test_an_interrupted_training_resumes_from_sae_lens_checkpoints_like_an_uninterrupted_one(tmp_path, monkeypatch):
    import paper_lib.sae as sae_mod

    store, _ = planted_store(tmp_path / "store", n_tokens=8000, n_features=12)
    spec = SAESpec(expansion=2, k=3, lr=3e-3, batch_size=128, epochs=4, dead_tokens=2000, normalize="per_adapter")
    clean = train_sae(store, spec, tmp_path / "clean", checkpoints=3)
    real = sae_mod.shard_batches

    def interrupted(*args, **kwargs):
        for i, batch in enumerate(real(*args, **kwargs)):
            if i == 180:  # 250 steps in all; checkpoints after ~63, ~125 and ~188
                raise KeyboardInterrupt("the GPU box went away")
            yield batch

    monkeypatch.setattr(sae_mod, "shard_batches", interrupted)
    with pytest.raises(KeyboardInterrupt):
        train_sae(store, spec, tmp_path / "resumed", checkpoints=3)
    assert {p.name for p in (tmp_path / "resumed" / "checkpoints").iterdir() if p.is_dir()} == {"8064", "16128"}
    monkeypatch.setattr(sae_mod, "shard_batches", real)
    resumed = train_sae(store, spec, tmp_path / "resumed", checkpoints=3)
    assert len(resumed) == len(clean) == 250 and resumed.step.tolist() == list(range(250))
    pd.testing.assert_frame_equal(resumed, clean, rtol=1e-4)
    a, _ = load_sae(tmp_path / "clean")
    b, _ = load_sae(tmp_path / "resumed")
    assert torch.allclose(a.W_enc, b.W_enc, atol=1e-5) and torch.allclose(a.threshold, b.threshold, atol=1e-5)
    # other settings do not resume from these checkpoints
    other = train_sae(store, dataclasses.replace(spec, lr=1e-3), tmp_path / "resumed", checkpoints=3)
    assert len(other) == 250 and not np.allclose(other.loss, clean.loss)


def test_scalar_engine_batches_fit_the_cache_budget(organism):
    """Spliced and steered generation holds two KV caches: batches shrink so that padded prompt + budget
    tokens times the batch size stay within ``cache_tokens``."""
    model, tok, _ = organism
    prompts = ["1 +1", "2 x2 +1 +1 +1 +1", "3", "4 +2", "5 x3 +1"]
    lengths = [len(tok(p, add_special_tokens=False)["input_ids"]) for p in prompts]
    engine = ScalarEngine(model, tok, {"as_is": lambda s: s}, batch_size=3, cache_tokens=3 * (max(lengths) + 40))
    batches = engine.batches(prompts, [40] * 5)
    assert [list(b) for b in batches] == [[0, 1, 2], [3, 4]]  # batch_size binds
    engine.cache_tokens = 2 * (max(lengths) + 40)
    batches = engine.batches(prompts, [40] * 5)
    assert sum(len(b) for b in batches) == 5 and all(len(b) <= 2 for b in batches)
    for b in batches:
        assert len(b) == 1 or len(b) * (max(lengths[i] for i in b) + 40) <= engine.cache_tokens
    engine.cache_tokens = 1  # one prompt always forms a batch
    assert [len(b) for b in engine.batches(prompts, [40] * 5)] == [1] * 5


def test_a_checkpoint_killed_while_its_curves_are_written_is_not_resumed_from(tmp_path, monkeypatch):
    """The curves mark a checkpoint whole; a torn file (114 of 3,247 rows) made a resume skip the wrong
    number of batches. Written to a temporary name and renamed, it is whole or absent."""
    from paper_lib.sae import HISTORY_FILE, _latest_checkpoint, write_csv_atomically

    for name in ("100", "200"):
        (tmp_path / name).mkdir()
    write_csv_atomically(pd.DataFrame({"step": range(100)}), tmp_path / "100" / HISTORY_FILE)
    real = pd.DataFrame.to_csv

    def torn(self, path, **kwargs):
        real(self.head(10), path, **kwargs)
        raise OSError("killed while writing")

    monkeypatch.setattr(pd.DataFrame, "to_csv", torn)
    with pytest.raises(OSError):
        write_csv_atomically(pd.DataFrame({"step": range(200)}), tmp_path / "200" / HISTORY_FILE)
    assert not (tmp_path / "200" / HISTORY_FILE).exists() and _latest_checkpoint(tmp_path).name == "100"


def test_long_prompts_prefill_both_caches_in_chunks_with_the_same_tokens(organism):
    """A batch whose prompts exceed ``prefill_tokens`` fills the two caches a chunk at a time (at 32B a whole
    batch of 8k-token prompts in one pass needs tens of GiB of temporaries); greedy tokens are unchanged."""
    from adapters import random_lora

    base, tok, _ = organism
    model = random_lora(base)
    prompts = [
        "<|im_start|>user\na7 b3 a+2 bx2 a<b a+1 ?b<|im_end|>\n<|im_start|>assistant\n",
        "<|im_start|>user\n3 x2<|im_end|>\n",
    ]
    whole = ScalarEngine(model, tok, {"x2": lambda s: 2 * s}).generate(prompts, 12, lambda s: 2 * s, [])
    chunked = ScalarEngine(model, tok, {"x2": lambda s: 2 * s}, prefill_tokens=8).generate(prompts, 12, lambda s: 2 * s, [])
    assert chunked == whole and len(whole[0]) == 12
