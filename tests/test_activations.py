import pytest
import torch
from adapters import random_lora

from paper_lib.activations import NoLoraError, find_adapters, lora_activations
from paper_lib.formats import ADAPTER_MODULES
from paper_lib.organism import Problem, textbook_document
from paper_lib.training import LoraSpec, lora_spec_for


def peft_organism(organism, spec):
    model, tok, _ = organism
    return random_lora(model, spec), tok


def test_lora_activations_equal_A_dot_module_input(organism):
    model, tok = peft_organism(organism, LoraSpec())
    docs = [textbook_document(Problem(7, ("+2", "x2", "+1"))), "<|im_start|>user\n3 x3 +1<|im_end|>\n"]
    batch = tok(docs, return_tensors="pt", padding=True)
    acts, layers, modules = lora_activations(model, batch["input_ids"], batch["attention_mask"])
    n_layers = organism[0].config.num_hidden_layers
    assert acts.shape == (2, batch["input_ids"].shape[1], n_layers, 7)
    assert modules == list(ADAPTER_MODULES) and layers == list(range(n_layers))
    inputs = {}
    handles = [
        m.register_forward_pre_hook(lambda mod, args, key=k: inputs.__setitem__(key, args[0].detach()))
        for k, m in find_adapters(model).items()
    ]
    with torch.no_grad():
        model(**batch)
    for h in handles:
        h.remove()
    worst = 0.0
    for (layer, module), x in inputs.items():
        A = find_adapters(model)[(layer, module)].lora_A["default"].weight  # [1, d_in]
        expected = (x.float() @ A.float().T)[..., 0]
        worst = max(worst, (acts[:, :, layers.index(layer), modules.index(module)] - expected).abs().max().item())
    assert worst <= 1e-5


def test_missing_modules_are_absent_not_zero_filled(organism):
    model, tok = peft_organism(organism, lora_spec_for("mlp"))
    batch = tok(["Q 1 +1\nthink\n"], return_tensors="pt")
    acts, layers, modules = lora_activations(model, batch["input_ids"])
    assert modules == ["gate_proj", "up_proj", "down_proj"] and acts.shape[-1] == 3
    model, tok = peft_organism(organism, LoraSpec(layers=(1, 3)))
    acts, layers, modules = lora_activations(model, batch["input_ids"])
    assert layers == [1, 3] and acts.shape[-2] == 2


def test_a_model_without_lora_gets_a_clear_error(organism):
    model, tok, _ = organism
    with pytest.raises(NoLoraError, match="no LoRA adapter"):
        lora_activations(model, tok(["Q 1"], return_tensors="pt")["input_ids"])


def test_extraction_shards_read_back_and_resume_bit_for_bit(organism, tmp_path, monkeypatch):
    import numpy as np

    import paper_lib.activations as acts_mod
    from paper_lib.activations import ActivationStore, extract_activation_shards
    from paper_lib.organism import Problem, textbook_document

    model, tok = peft_organism(organism, LoraSpec())
    texts = [textbook_document(Problem(s, ops)) for s in range(10) for ops in [("+1",), ("x2", "+2", "x3")]]
    clean = extract_activation_shards(model, tok, texts, tmp_path / "clean", batch_size=3, docs_per_shard=4)
    assert len(clean) == 20 and clean.modules == list(ADAPTER_MODULES)
    ids, values = clean.document(5)
    direct, _, _ = lora_activations(model, tok([texts[5]], return_tensors="pt")["input_ids"])
    assert ids.tolist() == tok(texts[5])["input_ids"]
    assert np.allclose(values, direct[0].numpy(), rtol=2e-3, atol=1e-3)  # float16 storage
    assert (
        clean.activations().shape == (len(clean.tokens()), model.config.num_hidden_layers, 7) and clean.document_ids()[-1] == 19
    )

    calls = {"n": 0}
    real = acts_mod.lora_activations

    def flaky(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 5:
            raise RuntimeError("interrupted")
        return real(*args, **kwargs)

    monkeypatch.setattr(acts_mod, "lora_activations", flaky)
    with pytest.raises(RuntimeError, match="interrupted"):
        extract_activation_shards(model, tok, texts, tmp_path / "resumed", batch_size=3, docs_per_shard=4)
    with pytest.raises(ValueError, match="unfinished"):
        ActivationStore(tmp_path / "resumed")
    monkeypatch.setattr(acts_mod, "lora_activations", real)
    resumed = extract_activation_shards(model, tok, texts, tmp_path / "resumed", batch_size=3, docs_per_shard=4)
    assert np.array_equal(resumed.activations(), clean.activations())
    assert np.array_equal(resumed.tokens(), clean.tokens())


def test_mlp_neurons_are_the_down_proj_input(organism):
    from paper_lib.activations import mlp_neuron_activations

    model, tok, _ = organism
    batch = tok(["Q 4 x3 +2\nthink\n"], return_tensors="pt")
    neurons = [(0, 5), (3, 100), (0, 7)]
    values = mlp_neuron_activations(model, batch["input_ids"], neurons)
    captured = {}
    mlps = {i: layer.mlp for i, layer in enumerate(model.model.layers)}
    handles = [mlps[i].down_proj.register_forward_pre_hook(lambda m, a, i=i: captured.__setitem__(i, a[0])) for i in (0, 3)]
    with torch.no_grad():
        model(**batch)
    for h in handles:
        h.remove()
    expected = torch.stack([captured[0][..., 5], captured[3][..., 100], captured[0][..., 7]], -1)
    assert values.shape == (1, batch["input_ids"].shape[1], 3) and torch.allclose(values, expected)
    gate = mlps[0].gate_proj
    with torch.no_grad():  # and it is act(gate)·up, computed independently from the layer-0 MLP input
        x = {}
        h = mlps[0].gate_proj.register_forward_pre_hook(lambda m, a: x.__setitem__("x", a[0]))
        model(**batch)
        h.remove()
        manual = torch.nn.functional.silu(gate(x["x"])) * mlps[0].up_proj(x["x"])
    assert torch.allclose(values[..., 0], manual[..., 5], atol=1e-5)
    with pytest.raises(ValueError, match="no MLP at some of layers"):
        mlp_neuron_activations(model, batch["input_ids"], [(9, 0)])


@pytest.mark.parametrize("merged", [False, True])
def test_readout_model_gives_the_same_scalars_and_logits(organism, merged):
    import copy

    from paper_lib.activations import build_readout_model, find_readouts

    model, tok = peft_organism(organism, LoraSpec())
    batch = tok(
        [textbook_document(Problem(4, ("x3", "+2"))), "<|im_start|>user\n3 x3<|im_end|>\n"], return_tensors="pt", padding=True
    )
    ref, layers, modules = lora_activations(model, batch["input_ids"], batch["attention_mask"])
    with torch.no_grad():
        ref_logits = model(**batch).logits
    readout = build_readout_model(copy.deepcopy(model), merged=merged)
    assert len(find_readouts(readout)) == 7 * model.config.num_hidden_layers and not any(
        "lora" in n for n, _ in readout.named_parameters()
    )
    got, got_layers, got_modules = lora_activations(readout, batch["input_ids"], batch["attention_mask"])
    assert (got_layers, got_modules) == (layers, modules)
    scale = ref.abs().max().item()
    assert (got - ref).abs().max().item() <= 1e-6 * max(1.0, scale) * 10  # float32 summation order only
    with torch.no_grad():
        assert (readout(**batch).logits - ref_logits).abs().max().item() < 1e-4
    mlp_only, _ = peft_organism(organism, lora_spec_for("mlp"))
    _, _, mods = lora_activations(build_readout_model(mlp_only, merged=merged), batch["input_ids"])
    assert mods == ["gate_proj", "up_proj", "down_proj"]


def test_extraction_split_over_processes_equals_one_process(organism, tmp_path):
    import numpy as np

    from paper_lib.activations import build_readout_model, extract_activation_shards

    model, tok = peft_organism(organism, LoraSpec())
    texts = [textbook_document(Problem(s, ("x2", "+1"))) for s in range(10)]
    one = extract_activation_shards(model, tok, texts, tmp_path / "one", batch_size=4, docs_per_shard=3)
    readout = build_readout_model(model)
    assert extract_activation_shards(readout, tok, texts, tmp_path / "two", 4, 3, process_index=1, num_processes=2) is None
    two = extract_activation_shards(readout, tok, texts, tmp_path / "two", 4, 3, process_index=0, num_processes=2)
    assert np.array_equal(one.tokens(), two.tokens())
    assert np.abs(one.activations().astype(np.float32) - two.activations().astype(np.float32)).max() <= 2e-3


def test_projections_with_A_rows_are_the_adapter_activations_and_controls_sample_right(organism):

    from paper_lib.activations import (
        find_adapters,
        projected_activations,
        random_directions,
        sample_mlp_neurons,
    )

    model, tok = peft_organism(organism, LoraSpec())
    batch = tok(["Q 1 +1 x2\nthink\n1+1=2;2x2=4"], return_tensors="pt")
    acts, layers, modules = lora_activations(model, batch["input_ids"])
    keys = [(1, "q_proj"), (3, "down_proj")]
    rows = {k: find_adapters(model)[k].lora_A["default"].weight.detach() for k in keys}
    got = projected_activations(model, batch["input_ids"], rows)
    for j, (layer, module) in enumerate(keys):
        assert torch.allclose(got[0, :, j], acts[0, :, layers.index(layer), modules.index(module)], atol=1e-5)
    neurons = sample_mlp_neurons(model, 50, seed=1)
    assert len(set(neurons)) == 50 and all(0 <= l < model.config.num_hidden_layers and 0 <= i < 512 for l, i in neurons)
    assert neurons == sample_mlp_neurons(model, 50, seed=1) != sample_mlp_neurons(model, 50, seed=2)
    dirs = random_directions(model, keys, seed=0)
    assert dirs[(3, "down_proj")].shape == (1, 512) and torch.isclose(dirs[(1, "q_proj")].norm(), torch.tensor(1.0))
    with pytest.raises(ValueError, match="no projection"):
        projected_activations(model, batch["input_ids"], {(model.config.num_hidden_layers, "q_proj"): rows[(1, "q_proj")]})


def test_mlp_neurons_are_read_by_index_without_an_identity_of_the_mlp_width(organism, monkeypatch):
    """At 32B an identity of the MLP width is 2.8 GB per sampled layer (~196 GB for 64 layers)."""
    from paper_lib.activations import mlp_neuron_directions, projected_activations, sample_mlp_neurons

    model, tok, _ = organism
    monkeypatch.setattr(torch, "eye", lambda *a, **k: pytest.fail("built an identity matrix"))
    neurons = sample_mlp_neurons(model, 12, seed=3)
    directions = mlp_neuron_directions(model, neurons)
    assert all(d.dtype == torch.long and d.ndim == 1 for d in directions.values())
    ids = tok(["3 x2 +1\nthink\n"], return_tensors="pt")["input_ids"]
    by_index = projected_activations(model, ids, directions)
    one_hot = {key: torch.nn.functional.one_hot(d, model.config.intermediate_size).float() for key, d in directions.items()}
    assert torch.equal(by_index, projected_activations(model, ids, one_hot))


def test_the_three_populations_come_from_one_forward_pass_and_equal_separate_reads(organism, tmp_path, monkeypatch):
    """MLP neurons and random directions are written beside the adapter scalars, in the same shards, from
    the same forward pass; each equals a separate read of that population; a changed population (another
    seed) is refused; the store reads them in blocks, by rows and around a token."""
    import numpy as np

    from paper_lib.activations import (
        ActivationStore,
        adapter_keys,
        build_readout_model,
        control_populations,
        extract_activation_shards,
        projected_activations,
    )

    model, tok = peft_organism(organism, LoraSpec())
    model = build_readout_model(model)
    texts = [textbook_document(Problem(s, ("x2", "+1", "x3"))) for s in range(7)]
    keys = adapter_keys(model)
    n_layers = model.config.num_hidden_layers
    assert keys == [(layer, module) for layer in range(n_layers) for module in ADAPTER_MODULES]
    controls = control_populations(model, keys, seed=3)
    assert [len(p.names) for p in controls.values()] == [7 * n_layers, 7 * n_layers]
    forwards = {"n": 0}
    real_forward = model.forward
    monkeypatch.setattr(model, "forward", lambda *a, **k: forwards.__setitem__("n", forwards["n"] + 1) or real_forward(*a, **k))
    store = extract_activation_shards(
        model, tok, texts, tmp_path / "acts", batch_size=3, docs_per_shard=4, dtype="float32", populations=controls
    )
    assert forwards["n"] == 3  # ceil(4/3) + ceil(3/3) batches: one forward pass each, all populations at once
    assert store.populations == ["LoRA", "MLP neuron", "random direction"]
    assert store.feature_names("MLP neuron") == controls["MLP neuron"].names
    for name, population in controls.items():
        expected = np.concatenate(
            [
                projected_activations(model, tok([t], return_tensors="pt")["input_ids"], population.directions)[0].numpy()
                for t in texts
            ]
        )
        got = np.concatenate(list(store.blocks(name, block_tokens=50)))
        assert got.shape == expected.shape and np.allclose(got, expected, atol=1e-5)
        assert np.array_equal(store.rows(10, 20, name), got[10:20])
    lora = np.concatenate(list(store.blocks(block_tokens=7)))
    assert np.array_equal(lora, store.activations().reshape(store.n_tokens, -1))
    held = np.concatenate(list(store.blocks(docs=[5, 1])))
    first, second = store.document(1)[1], store.document(5)[1]
    assert np.array_equal(held, np.concatenate([first, second]).reshape(len(held), -1))
    with pytest.raises(KeyError, match="population 'SAE' is not in"):
        store.rows(0, 1, "SAE")
    with pytest.raises(ValueError, match="populations"):  # another sample of neurons: not these shards
        extract_activation_shards(
            model,
            tok,
            texts,
            tmp_path / "acts",
            batch_size=3,
            docs_per_shard=4,
            dtype="float32",
            populations=control_populations(model, keys, seed=4),
        )
    (tmp_path / "acts" / "shard_00001.mlp_neuron.npy").write_bytes(b"")
    with pytest.raises(ValueError, match="mlp_neuron.npy has 0 bytes"):
        ActivationStore(tmp_path / "acts")


def test_randomized_weights_are_an_untrained_model_of_the_same_shape(organism):
    """The scorer's control model: every weight of the readout model re-drawn in place as Qwen2 initialises
    it (linear and embedding ~ N(0, initializer_range), norms 1, the adapter's B = 0), the same for the
    same seed; PEFT-free readouts still record a scalar per projection."""
    import copy

    from paper_lib.activations import build_readout_model, find_readouts, randomize_weights

    model, tok = peft_organism(organism, LoraSpec())
    trained = build_readout_model(copy.deepcopy(model), merged=False)
    before = {n: p.clone() for n, p in trained.named_parameters()}
    one = randomize_weights(copy.deepcopy(trained), seed=3)
    two = randomize_weights(copy.deepcopy(trained), seed=3)
    std = trained.config.initializer_range
    for (name, p), (_, q) in zip(one.named_parameters(), two.named_parameters()):
        assert torch.equal(p, q), name
        if name.endswith("a_row"):
            continue  # the read-out direction is kept: only what feeds it is untrained
        if "norm" in name:
            assert torch.equal(p, torch.ones_like(p)), name
        elif name.endswith(("update", "bias")):
            assert not p.any(), name
        else:
            assert not torch.equal(p, before[name]), name
            assert abs(p.std().item() - std) < 0.25 * std, name
    batch = tok(["<|im_start|>user\n3 x3<|im_end|>\n"], return_tensors="pt")
    got, layers, modules = lora_activations(one, batch["input_ids"])
    assert len(find_readouts(one)) == 7 * one.config.num_hidden_layers and torch.isfinite(got).all()


def test_every_process_of_an_eight_gpu_extraction_gets_a_shard_whatever_the_corpus():
    """1,000 traces at 256 a shard made 4 shards: 4 of 8 GPUs idle. The shard size depends on the corpus
    only (a resumed run with another process count finds the same shards)."""
    import math

    from paper_lib.activations import shard_docs

    for n_docs in (8, 100, 1000, 5000):
        n_shards = math.ceil(n_docs / shard_docs(n_docs))
        assert all(list(range(i, n_shards, 8)) for i in range(8)), n_docs
        assert shard_docs(n_docs) <= 256
    assert shard_docs(1000) == 125 and shard_docs(100_000) == 256 and shard_docs(3) == 1
