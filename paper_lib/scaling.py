"""How notebooks 04-06 scale with the number of tokens: peak memory and wall time of each streamed stage on
synthetic activation stores of growing size (``make bench-scale``; a benchmark, not a timed test).

At the paper's scale the adapter state is ~10M tokens x 448 scalars (9 GB in float16); every stage below
reads it block by block, so its peak memory should not grow with the tokens and its time should grow
linearly. Each stage runs in a fresh process (its peak resident memory is its own), on a store of the
paper's geometry (64 layers x 7 modules, float16) with two control populations of 448 features beside the
adapters, as notebook 04 extracts them.

Stages (what the notebooks run on such a store):
- ``04 top-k + page``: exact top-k of all 3 x 896 signed features, then the page's context windows;
- ``04 role scores``: the role scorer on the adapters (top-k, then AUROCs from float16 histograms);
- ``04 judge inputs``: judge examples and non-activating contexts for 40 features per population;
- ``05 SAE inputs``: the per-input scales pass and one epoch of shuffled training batches;
- ``05 held-out metrics``: FVU / L0 / dead latents on every token (two passes);
- ``06 latent summary``: fired counts, mass, top-k and histograms of all 3,584 latents, then the
  dashboard's windows for 200 live latents.
"""

from __future__ import annotations

import argparse
import json
import logging
import resource
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from paper_lib.activations import LORA, write_activation_store
from paper_lib.formats import ADAPTER_MODULES

log = logging.getLogger(__name__)

LAYERS, DOC_TOKENS, DOCS_PER_SHARD = 64, 2048, 64  # the paper's geometry; shards of 131k tokens
CONTROLS = ("MLP neuron", "random direction")
STAGES = ("04 top-k + page", "04 role scores", "04 judge inputs", "05 SAE inputs", "05 held-out metrics", "06 latent summary")
N_ROLES = 12


def synthetic_documents(n_tokens: int, seed: int = 0) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Documents of ``DOC_TOKENS`` tokens: sparse heavy-tailed scalars (most near zero, a few large), token
    ids from a 152k vocabulary; generated one document at a time."""
    rng = np.random.default_rng(seed)
    for _ in range(n_tokens // DOC_TOKENS):
        values = rng.standard_normal((DOC_TOKENS, LAYERS * 7), dtype=np.float32) * 0.1
        spikes = rng.random(values.shape) < 0.01
        values[spikes] += rng.exponential(3.0, int(spikes.sum())).astype(np.float32)
        yield rng.integers(0, 152064, DOC_TOKENS).astype(np.int32), values.reshape(DOC_TOKENS, LAYERS, 7)


def build_store(out_dir: Path, n_tokens: int, seed: int = 0) -> Path:
    """A synthetic store of ``n_tokens`` (rounded down to whole documents) with the two control populations
    written beside the adapters as extra shard files, as notebook 04's one-pass extraction writes them."""
    from paper_lib.activations import ActivationStore, _shard_paths, finish_shard

    if (out_dir / "meta.json").is_file() and ActivationStore(
        out_dir, verify=False
    ).n_tokens == n_tokens // DOC_TOKENS * DOC_TOKENS:
        return out_dir
    store = write_activation_store(
        out_dir, synthetic_documents(n_tokens, seed), list(range(LAYERS)), list(ADAPTER_MODULES), docs_per_shard=DOCS_PER_SHARD
    )
    rng = np.random.default_rng(seed + 1)
    names = store.feature_names()
    meta = json.loads((out_dir / "meta.json").read_text())
    meta["populations"] = {
        name: {"names": [f"{n}.{i}" for n in names], "directions": "synthetic"} for i, name in enumerate(CONTROLS)
    }
    for shard in range(len(store.shards)):
        paths = _shard_paths(out_dir, shard, CONTROLS)
        n = len(np.load(paths["tokens"], mmap_mode="r"))
        for name in CONTROLS:
            np.save(paths[name], (rng.standard_normal((n, len(names)), dtype=np.float32)).astype(np.float16))
        finish_shard(paths)
    (out_dir / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    return out_dir


def random_sae(d_in: int, expansion: int = 8, k: int = 16, seed: int = 0):
    """A JumpReLU SAE (sae-lens) with random weights and thresholds set so that about ``k`` latents fire on a
    typical token: the cost of encoding does not depend on what the weights learned."""
    import torch
    from sae_lens import JumpReLUSAE, JumpReLUSAEConfig

    torch.manual_seed(seed)
    sae = JumpReLUSAE(JumpReLUSAEConfig(d_in=d_in, d_sae=expansion * d_in))
    with torch.no_grad():
        sae.W_enc.normal_(0, d_in**-0.5)
        sae.W_dec.copy_(sae.W_enc.T)
        sae.threshold.fill_(0.32)  # ~16 of 3,584 above it for the synthetic scalars
    return sae.eval(), torch.ones(d_in)


def run_stage(stage: str, store_dir: Path) -> dict[str, float]:
    """One stage on the store, in this process: wall seconds and peak resident memory (MiB)."""
    import pandas as pd

    from paper_lib.activations import ActivationStore
    from paper_lib.interp import SignedFeatures, feature_examples, score_against_roles, top_features
    from paper_lib.judge import non_activating_examples
    from paper_lib.sae import LatentFeatures, latent_summary, sae_metrics, shard_batches, store_chunks

    start = time.perf_counter()
    store = ActivationStore(store_dir, verify=False)
    decode = str
    if stage == "04 top-k + page":
        for name in store.populations:
            signed = SignedFeatures(store.features(name))
            top = top_features(signed, 50)
            if name == LORA:
                feature_examples(signed, store, decode, top, k=10, width=12)
    elif stage == "04 role scores":
        rng = np.random.default_rng(0)  # roles as a categorical: one byte a token, as the organism's would be
        roles = pd.Categorical.from_codes(
            rng.integers(0, N_ROLES, store.n_tokens).astype(np.int8), [f"role{i}" for i in range(N_ROLES)]
        )
        score_against_roles(SignedFeatures(store.features()), roles, {f"role{i}": f"family{i % 3}" for i in range(N_ROLES)}, k=50)
    elif stage == "04 judge inputs":
        for name in store.populations:
            signed = SignedFeatures(store.features(name))
            chosen = np.random.default_rng(0).permutation(len(signed.names))[:40]
            top = top_features(signed, 15)
            feature_examples(signed, store, decode, top, k=15, width=8, columns=chosen)
            for f in chosen:
                non_activating_examples(signed, int(f), store, decode, 5, 8)
    elif stage == "05 SAE inputs":
        sum_squares = np.zeros(len(store.feature_names()))
        for chunk in store_chunks(store):
            sum_squares += np.square(chunk, dtype=np.float64).sum(0)
        batches = shard_batches(store, 512, np.ones(len(sum_squares), np.float32))
        for _ in range(store.n_tokens // 512):
            next(batches)
    elif stage == "05 held-out metrics":
        sae, scales = random_sae(len(store.feature_names()))
        sae_metrics(sae, scales, lambda: store.blocks())
    elif stage == "06 latent summary":
        sae, scales = random_sae(len(store.feature_names()))
        summary = latent_summary(sae, scales, store.features(), k=50)
        live = np.flatnonzero(summary["fired"])[:200]
        features = LatentFeatures(sae, scales, store.features(), columns=live)
        feature_examples(features, store, decode, (summary["top_values"][live], summary["top_indices"][live]), k=12, width=12)
    else:
        raise ValueError(f"unknown stage {stage!r}; one of {STAGES}")
    return {"seconds": time.perf_counter() - start, "peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def measure(stage: str, store_dir: Path) -> dict[str, float]:
    """``run_stage`` in a fresh Python process, so that its peak memory is its own."""
    out = subprocess.run(
        [sys.executable, "-m", "paper_lib.scaling", "--stage", stage, "--store", str(store_dir)],
        check=True,
        capture_output=True,
        text=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="peak memory and time of notebooks 04-06's stages vs tokens")
    parser.add_argument("--tokens", default="1000000,4000000", help="store sizes, comma-separated")
    parser.add_argument("--dir", default="build/bench_scale", help="where the synthetic stores are written")
    parser.add_argument("--stages", default=",".join(STAGES), help="stages to run, comma-separated")
    parser.add_argument("--json", default="", help="also write the rows here")
    parser.add_argument("--stage", help=argparse.SUPPRESS)  # internal: run one stage in this process
    parser.add_argument("--store", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.stage:
        print(json.dumps(run_stage(args.stage, Path(args.store))))
        return
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    rows = []
    baseline = None
    for n_tokens in (int(n) for n in args.tokens.split(",")):
        store_dir = build_store(Path(args.dir) / f"store_{n_tokens}", n_tokens)
        for stage in args.stages.split(","):
            row = {"tokens": n_tokens // DOC_TOKENS * DOC_TOKENS, "stage": stage, **measure(stage, store_dir)}
            log.info("%s", row)
            rows.append(row)
        if baseline is None:
            baseline = n_tokens
    import pandas as pd

    table = (
        pd.DataFrame(rows)
        .pivot(index="stage", columns="tokens", values=["peak_mib", "seconds"])
        .loc[[s for s in STAGES if s in args.stages.split(",")]]
    )
    sizes = sorted({r["tokens"] for r in rows})
    if len(sizes) > 1:
        small, large = sizes[0], sizes[-1]
        table[("memory ratio", f"{large}/{small}")] = table[("peak_mib", large)] / table[("peak_mib", small)]
        table[("time ratio", f"{large}/{small}")] = table[("seconds", large)] / table[("seconds", small)]
    print(table.round(2).to_string())
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
