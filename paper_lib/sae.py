"""A BatchTopK sparse autoencoder on the whole adapter state, and splicing it back into the model.

Training is sae-lens's own (``SAETrainer`` + ``BatchTopKTrainingSAE``, AuxK for dead latents), fed by a
data provider that streams the activation shards of ``paper_lib.activations``; no HookedTransformer.
The input is the layer-major vector of every adapter scalar of a token (64 x 7 = 448 at 32B). With
``normalize="per_adapter"`` each input dimension is divided by its root-mean-square over the training
tokens first (sae-lens only offers one global scale or full whitening; adapter scales differ by orders of
magnitude, so one global scale would let a few adapters dominate the loss); the scales are saved beside
the SAE and undone on reconstruction. Inference uses sae-lens's saved JumpReLU form (the learned
threshold), so a token's latents never depend on the rest of its batch.

The splice: the adapters act on the model only through their scalars (update = scale · a · B), so
replacing the scalars by the SAE's reconstruction inside the forward pass measures exactly how much of the
adapter's effect the SAE keeps. Teacher-forced: one pass reads the scalars, a second pass runs with the
reconstruction in their place. Generation does the same token by token with two KV caches.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from paper_lib.ablation import ablated, chunked_kl, split_head, trace_means
from paper_lib.activations import ActivationStore, find_adapters, transformed_forward
from paper_lib.config import Config, ConfigError, describe_differences, differences, fingerprint, require
from paper_lib.training import input_device

log = logging.getLogger(__name__)

SAE_SUBDIR, SCALES_FILE, HISTORY_FILE = "sae", "input_scales.npy", "training_history.csv"


@dataclasses.dataclass(frozen=True)
class SAESpec(Config):
    """BatchTopK SAE settings; defaults are the paper's (8x, k=16, lr 5e-4, batch 512, one epoch,
    AuxK weight 1/32, dead = no firing in 1M tokens) plus per-adapter input normalisation."""

    expansion: int = 8
    k: float = 16
    lr: float = 5e-4
    batch_size: int = 512
    epochs: float = 1.0
    aux_coefficient: float = 1 / 32
    dead_tokens: int = 1_000_000
    normalize: str = "per_adapter"  # or "none" (the paper)
    seed: int = 0
    device: str = "cpu"

    def validate(self) -> None:
        require(self.expansion >= 1, "expansion", "must be >= 1")
        require(self.k > 0, "k", "must be > 0")
        require(self.lr > 0, "lr", "must be > 0")
        require(self.batch_size >= 1, "batch_size", "must be >= 1")
        require(self.epochs > 0, "epochs", "must be > 0")
        require(self.dead_tokens >= self.batch_size, "dead_tokens", "must cover at least one batch")
        require(self.normalize in ("per_adapter", "none"), "normalize", "must be 'per_adapter' or 'none'")


def _scales_from_moments(sum_squares: np.ndarray, n: int, normalize: str) -> np.ndarray:
    """Per-dimension divisor from sums of squares over ``n`` tokens: RMS (``per_adapter``) or ones (``none``)."""
    if normalize == "none":
        return np.ones(len(sum_squares), dtype=np.float32)
    rms = np.sqrt(sum_squares / max(n, 1))
    return np.where(rms > 0, rms, 1.0).astype(np.float32)


def store_matrix(store: ActivationStore, docs: Sequence[int] | None = None) -> np.ndarray:
    """The store's activations as ``[tokens, n_layers * n_modules]`` float32 (layer-major), for the given
    documents (all by default). Loads them into memory (small stores, tests): passes over a real-scale
    store go through ``store.blocks``."""
    return np.concatenate(list(store_chunks(store, docs)))


def store_chunks(store: ActivationStore, docs: Sequence[int] | None = None) -> Iterator[np.ndarray]:
    """The store's activations in order, as ``[rows, d_in]`` float32 blocks (memory: one block)."""
    return store.blocks(docs=docs)


def shard_batches(
    store: ActivationStore,
    batch_size: int,
    scales: np.ndarray,
    seed: int = 0,
    docs: Sequence[int] | None = None,
    shuffle_tokens: int = 262144,
) -> Iterator[torch.Tensor]:
    """An endless stream of shuffled ``[batch, d_in]`` training batches: shards in a new random order each
    pass, tokens shuffled within windows of ``shuffle_tokens`` of a shard (memory: one window, ~0.5 GB at
    448 inputs, however large the shard), restricted to ``docs`` if given."""
    rng = np.random.default_rng(seed)
    carry = np.empty((0, len(scales)), dtype=np.float32)
    while True:
        for shard in rng.permutation(len(store.shards)):
            for x in store.blocks(docs=docs, block_tokens=shuffle_tokens, shards=[int(shard)]):
                x = np.concatenate([carry, x[rng.permutation(len(x))] / scales])
                n = len(x) // batch_size * batch_size
                for i in range(0, n, batch_size):
                    yield torch.from_numpy(x[i : i + batch_size].copy())
                carry = x[n:]


CHECKPOINTS_DIR = "checkpoints"


def _history_row(trainer: Any, out: Any) -> dict[str, float]:
    with torch.no_grad():
        resid = (out.sae_out - out.sae_in).pow(2).sum()
        total = (out.sae_in - out.sae_in.mean(0)).pow(2).sum()
        return {
            "step": trainer.n_training_steps,
            "loss": float(out.loss),
            "mse": float(out.losses["mse_loss"]),
            "aux": float(out.losses.get("auxiliary_reconstruction_loss", 0.0)),
            "fvu": float(resid / total),
            "l0": float((out.feature_acts > 0).float().sum(-1).mean()),
            "dead": int(trainer.dead_neurons.sum()),
        }


def write_csv_atomically(frame: pd.DataFrame, path: Path) -> None:
    """``frame`` to ``path`` whole or not at all (a temporary name, then a rename): a checkpoint's curves mark
    it complete, and a run killed while writing them must not leave a torn file that a resume would read."""
    tmp = path.with_name(path.name + ".tmp")
    frame.to_csv(tmp, index=False)
    os.replace(tmp, path)


def _latest_checkpoint(checkpoints: Path) -> Path | None:
    """The checkpoint with the most training samples whose trainer state and curves were written in full."""
    done = (
        [p for p in checkpoints.iterdir() if p.is_dir() and p.name.isdigit() and (p / HISTORY_FILE).is_file()]
        if checkpoints.is_dir()
        else []
    )
    return max(done, key=lambda p: int(p.name)) if done else None


def train_sae(
    store: ActivationStore,
    spec: SAESpec,
    out_dir: str | Path,
    train_docs: Sequence[int] | None = None,
    d_in_check: int | None = None,
    checkpoints: int = 4,
) -> pd.DataFrame:
    """Train with sae-lens and save the inference SAE (``out_dir/sae``), the input scales, the per-step
    history (loss, MSE, AuxK, FVU, L0 of each batch) and ``config.json``. Returns the history.

    sae-lens saves ``checkpoints`` checkpoints on the way (weights, optimizer, schedules and dead-latent
    counters, under ``out_dir/checkpoints``), each with the curves so far; an interrupted run resumes from
    the latest one with the same settings and inputs, skipping the batches it had seen (the batch order is
    fixed by the seed), so a resumed run trains like an uninterrupted one."""
    from sae_lens import BatchTopKTrainingSAE, BatchTopKTrainingSAEConfig
    from sae_lens.config import LoggingConfig, SAETrainerConfig
    from sae_lens.training.sae_trainer import SAETrainer

    class RecordingTrainer(SAETrainer):
        """sae-lens's trainer, keeping its curves: sae-lens logs only to wandb, and ``step`` is its documented
        public seam ("used by fit() and external coordinators"), so the curves are read there."""

        history: list[dict[str, float]]

        def step(self, batch: torch.Tensor) -> Any:
            out = super().step(batch)
            self.history.append(_history_row(self, out))
            return out

    out_dir = Path(out_dir)
    torch.manual_seed(spec.seed)
    d_in = len(store.layers) * len(store.modules)
    if d_in_check is not None and d_in != d_in_check:
        raise ValueError(f"the store has {d_in} adapter scalars per token, expected {d_in_check}")
    n_train, sum_squares = 0, np.zeros(d_in)
    for chunk in store_chunks(store, train_docs):  # streamed: a 10M-token store never sits in memory
        n_train += len(chunk)
        sum_squares += np.square(chunk, dtype=np.float64).sum(0)
    scales = _scales_from_moments(sum_squares, n_train, spec.normalize)
    sae = BatchTopKTrainingSAE(
        BatchTopKTrainingSAEConfig(
            d_in=d_in, d_sae=spec.expansion * d_in, k=spec.k, aux_loss_coefficient=spec.aux_coefficient, device=spec.device
        )
    )
    window = max(1, spec.dead_tokens // spec.batch_size)
    checkpoint_dir = out_dir / CHECKPOINTS_DIR
    run = {"spec": spec.to_dict(), "inputs": sae_inputs(store, train_docs)}
    if (
        checkpoint_dir.is_dir()
        and (checkpoint_dir / "run.json").is_file()
        and json.loads((checkpoint_dir / "run.json").read_text()) != run
    ):
        log.info("checkpoints in %s come from other settings or inputs: not resumed, replaced", checkpoint_dir)
        import shutil

        shutil.rmtree(checkpoint_dir)
    checkpoint_dir.mkdir(parents=True, exist_ok=True)
    (checkpoint_dir / "run.json").write_text(json.dumps(run, indent=2) + "\n")
    batches = (b.to(spec.device) for b in shard_batches(store, spec.batch_size, scales, spec.seed, train_docs))
    trainer = RecordingTrainer(
        cfg=SAETrainerConfig(
            total_training_samples=int(spec.epochs * n_train),
            train_batch_size_samples=spec.batch_size,
            lr=spec.lr,
            lr_end=spec.lr / 10,
            device=spec.device,
            dead_feature_window=window,
            feature_sampling_window=window,
            n_checkpoints=checkpoints,
            checkpoint_path=str(checkpoint_dir),
            logger=LoggingConfig(log_to_wandb=False),
        ),
        sae=sae,
        data_provider=batches,
        # sae-lens's checkpoint hook: the curves so far go beside each checkpoint, written last (marks it whole)
        save_checkpoint_fn=lambda checkpoint_path: (
            checkpoint_path is not None and write_csv_atomically(pd.DataFrame(trainer.history), checkpoint_path / HISTORY_FILE)
        ),
    )
    trainer.history = []
    latest = _latest_checkpoint(checkpoint_dir)
    if latest is not None:  # resume, as sae-lens's own training runner does
        trainer.load_trainer_state(latest)
        sae.load_weights_from_checkpoint(latest)
        trainer.history = pd.read_csv(latest / HISTORY_FILE).to_dict("records")
        # sae-lens checkpoints inside a step, before it counts the step: the batches trained on are the rows
        trainer.n_training_steps = len(trainer.history)
        trainer.checkpoint_thresholds = [t for t in trainer.checkpoint_thresholds if t >= trainer.n_training_samples]
        for _ in range(len(trainer.history)):  # skip the batches already trained on
            next(batches)
        log.info("resuming SAE training from %s (%d samples)", latest, trainer.n_training_samples)
    trainer.fit()
    sae.save_inference_model(out_dir / SAE_SUBDIR)
    make_self_contained(out_dir / SAE_SUBDIR, scales, store)
    np.save(out_dir / SCALES_FILE, scales)  # kept for the metrics in normalised units; the SAE no longer needs it
    frame = pd.DataFrame(trainer.history)
    frame.to_csv(out_dir / HISTORY_FILE, index=False)
    spec.save(out_dir)
    return frame


INPUTS_FILE = "inputs.json"


def sae_inputs(store: ActivationStore, train_docs: Sequence[int] | None) -> dict[str, Any]:
    """What an SAE is trained on: the activation store (its meta: layout, texts, adapter) and the documents."""
    docs = list(range(len(store))) if train_docs is None else [int(d) for d in train_docs]
    return {"store": fingerprint(store.meta), "train_docs": fingerprint(docs), "n_train_docs": len(docs)}


def train_or_reuse_sae(
    store: ActivationStore, spec: SAESpec, out_dir: str | Path, train_docs: Sequence[int] | None = None, overwrite: bool = False
) -> pd.DataFrame:
    """``train_sae``, unless ``out_dir`` holds an SAE trained with the same spec on the same inputs (its
    history is returned); one trained with other settings or other activations is refused, naming what
    differs, unless ``overwrite``."""
    out_dir = Path(out_dir)
    inputs = sae_inputs(store, train_docs)
    if not overwrite and (out_dir / SAE_SUBDIR).is_dir() and (out_dir / HISTORY_FILE).is_file():
        saved_inputs = json.loads((out_dir / INPUTS_FILE).read_text()) if (out_dir / INPUTS_FILE).is_file() else {}
        diff = {**differences(SAESpec.load(out_dir).to_dict(), spec.to_dict()), **differences(saved_inputs, inputs)}
        if diff:
            raise ConfigError(
                f"{out_dir} holds an SAE trained with other settings or inputs "
                f"({describe_differences(diff)}); set OVERWRITE True or choose another OUTPUT_DIR"
            )
        return pd.read_csv(out_dir / HISTORY_FILE)
    history = train_sae(store, spec, out_dir, train_docs)
    (out_dir / INPUTS_FILE).write_text(json.dumps(inputs, indent=2) + "\n")
    return history


FOLDED = "per-input scales folded into W_enc, b_dec and W_dec: feed raw adapter scalars"


@torch.no_grad()
def fold_input_scales(sae: Any, scales: torch.Tensor, unfold: bool = False) -> None:
    """Fold the per-input normalisation x -> x / s into a JumpReLU SAE's weights, in place, so that the
    SAE reads raw inputs: (x/s - b_dec) W_enc = (x - s b_dec) (W_enc / s) and (f W_dec + b_dec) s =
    f (W_dec s) + s b_dec. The pre-activations, hence the latents and the learned thresholds, are
    unchanged. ``unfold`` undoes it. Hand-written because sae-lens folds only one scalar scale
    (``fold_activation_norm_scaling_factor``), not one per input."""
    s = scales.to(sae.W_enc.device, sae.W_enc.dtype)
    if unfold:
        s = 1 / s
    sae.W_enc.mul_(1 / s[:, None])
    sae.W_dec.mul_(s[None, :])
    sae.b_dec.mul_(s)


def make_self_contained(path: str | Path, scales: np.ndarray, store: ActivationStore) -> None:
    """Rewrite the saved inference SAE at ``path`` so that ``sae_lens.SAE.load_from_disk(path)`` alone, fed
    the raw adapter scalars in the store's layout, gives the latents the notebooks use; its metadata
    names the base model, the adapter, the layout and the traces."""
    from sae_lens import SAE

    sae = SAE.load_from_disk(str(path))
    fold_input_scales(sae, torch.from_numpy(np.asarray(scales, dtype=np.float32)))
    provenance = store.meta.get("provenance", {})
    for key, value in {
        "input_scaling": FOLDED,
        "base_model": provenance.get("model"),
        "adapter_weights": provenance.get("adapter_weights"),
        "layers": list(store.layers),
        "modules": list(store.modules),
        "layout": "layer-major: input index = layer position * len(modules) + module position",
        "traces": store.meta.get("texts"),
        "hook_name": "lora_A outputs (a = A·x) of every adapted projection",
    }.items():
        sae.cfg.metadata[key] = value
    sae.save_model(str(path))


def load_sae(out_dir: str | Path, device: str = "cpu") -> tuple[Any, torch.Tensor]:
    """The inference SAE (sae-lens JumpReLU, the learned threshold) in the notebooks' convention (it reads
    inputs divided by ``scales``), and the input scales. On disk the scales are folded in: sae-lens
    alone reads raw inputs (``make_self_contained``)."""
    from sae_lens import SAE

    out_dir = Path(out_dir)
    if not (out_dir / SAE_SUBDIR).is_dir():
        raise FileNotFoundError(f"no trained SAE at {out_dir / SAE_SUBDIR}; run notebook 05 (or train_sae) first")
    sae = SAE.load_from_disk(str(out_dir / SAE_SUBDIR), device=device)
    scales = torch.from_numpy(np.load(out_dir / SCALES_FILE)).to(device)
    if sae.cfg.metadata.get("input_scaling") == FOLDED:
        fold_input_scales(sae, scales, unfold=True)
    return sae.eval(), scales


def sae_fingerprint(out_dir: str | Path) -> str:
    """A content hash of a trained SAE (its saved weights, config and input scales): spliced and steered
    samples record it, so another SAE in the same folder never reuses them."""
    import hashlib

    out_dir = Path(out_dir)
    digest = hashlib.sha256()
    for path in sorted((out_dir / SAE_SUBDIR).glob("*")) + [out_dir / SCALES_FILE]:
        if path.is_file():
            digest.update(path.name.encode() + path.read_bytes())
    return digest.hexdigest()[:16]


def check_sae_adapter(store_provenance: dict[str, Any], adapter: dict[str, Any]) -> None:
    """Refuse to splice or steer an SAE into an adapter other than the one whose activations it was
    trained on (the store's provenance names the adapter's weights), naming both."""
    from paper_lib.config import ConfigError

    trained_on, given = store_provenance.get("adapter_weights"), adapter.get("adapter_weights")
    if trained_on is not None and trained_on != given:
        raise ConfigError(
            f"the SAE was trained on the activations of adapter {trained_on}, but ADAPTER_RUN holds adapter {given}: "
            "splicing it there measures nothing; give the ADAPTER_RUN whose activations notebook 04 extracted"
        )


@torch.no_grad()
def encode(sae: Any, scales: torch.Tensor, acts: torch.Tensor) -> torch.Tensor:
    """Latents ``[..., d_sae]`` of adapter states ``[..., d_in]`` (per token, batch-independent)."""
    return sae.encode(acts.to(scales.device, torch.float32) / scales)


@torch.no_grad()
def reconstruct(sae: Any, scales: torch.Tensor, acts: torch.Tensor) -> torch.Tensor:
    """The SAE's reconstruction of adapter states, in the adapters' own units."""
    return sae.decode(encode(sae, scales, acts)) * scales


@torch.no_grad()
def sae_metrics(
    sae: Any, scales: torch.Tensor, acts: np.ndarray | Callable[[], Iterable[np.ndarray]], batch_size: int = 8192
) -> dict[str, float]:
    """On held-out tokens: FVU in the SAE's input space (each adapter normalised) and in raw units, mean L0,
    the fraction of latents that never fire, and the firing count of every latent. ``acts``: ``[tokens,
    d_in]``, or a function returning the tokens' blocks afresh (two streamed passes: the means, then the
    residuals), e.g. ``lambda: store.blocks(docs=heldout)``."""
    chunks = acts if callable(acts) else (lambda: [np.asarray(acts)])
    n, sum_n, sum_raw = 0, 0.0, 0.0
    for block in chunks():
        x = torch.from_numpy(np.asarray(block, dtype=np.float32)).to(scales.device)
        n += len(x)
        sum_n, sum_raw = sum_n + (x / scales).sum(0, dtype=torch.float64), sum_raw + x.sum(0, dtype=torch.float64)
    if n == 0:
        raise ValueError("no held-out tokens to measure the SAE on")
    mean_n, mean_raw = (sum_n / n).float(), (sum_raw / n).float()
    resid_n = total_n = resid_raw = total_raw = l0 = 0.0
    fired = torch.zeros(sae.cfg.d_sae)
    for block in chunks():
        x = torch.from_numpy(np.asarray(block, dtype=np.float32))
        for i in range(0, len(x), batch_size):
            chunk = x[i : i + batch_size].to(scales.device)
            latents = encode(sae, scales, chunk)
            recon_n = sae.decode(latents)
            resid_n += float((recon_n - chunk / scales).pow(2).sum())
            total_n += float((chunk / scales - mean_n).pow(2).sum())
            resid_raw += float((recon_n * scales - chunk).pow(2).sum())
            total_raw += float((chunk - mean_raw).pow(2).sum())
            active = latents > 0
            l0 += float(active.sum())
            fired += active.sum(0).float().cpu()
    return {
        "fvu": resid_n / total_n,
        "fvu_raw": resid_raw / total_raw,
        "l0": l0 / n,
        "dead_fraction": float((fired == 0).float().mean()),
        "tokens": n,
        "fired": fired.numpy(),
    }


# ----------------------------------------------------------------------------------------------------
# The splice: the SAE reconstruction in place of the adapter scalars


def state_transform(sae: Any, scales: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    """A scalar transform for ``transformed_forward``: the SAE reconstruction of each token's adapter
    state (layer-major)."""

    def transform(scalars: torch.Tensor) -> torch.Tensor:
        flat = scalars.reshape(*scalars.shape[:2], -1)
        return reconstruct(sae, scales, flat).reshape(scalars.shape).cpu()

    return transform


@torch.no_grad()
def splice_kl(
    model: torch.nn.Module,
    batches: Sequence[dict[str, torch.Tensor]],
    sae: Any,
    scales: torch.Tensor,
    adapter: str = "default",
    chunk_elements: int = 2**26,
) -> pd.DataFrame:
    """Per trace: KL(full || no adapter) and KL(full || SAE-spliced) over the scored positions, and the
    fraction of the adapter's effect the splice recovers, 1 - KL_spliced / KL_no_adapter (per trace).

    Batches go to the model's device; logits exist only for scored positions, ``chunk_elements`` at a
    time (at a 152k vocabulary, full-sequence logits are the memory hog)."""
    decoder, head = split_head(model)
    device = input_device(model)
    rows, trace = [], 0
    all_keys = list(find_adapters(model, adapter))
    transform = state_transform(sae, scales)
    for batch in tqdm(batches, desc="splice", unit="batch"):
        inputs = {"input_ids": batch["input_ids"].to(device), "attention_mask": batch["attention_mask"].to(device)}
        inputs["use_cache"] = False  # a KV cache nobody reads: 32 GiB at 32B for 131k tokens
        mask = batch["score_mask"].bool().to(device)
        reference = decoder(**inputs).last_hidden_state[mask]
        with ablated(model, all_keys, adapter):
            none = decoder(**inputs).last_hidden_state[mask]
        spliced = transformed_forward(decoder, transform, adapter, **inputs).last_hidden_state[mask]
        kl_none = trace_means(chunked_kl(head, reference, none, chunk_elements), mask)
        kl_splice = trace_means(chunked_kl(head, reference, spliced, chunk_elements), mask)
        rows += [
            {"trace": trace + i, "kl_no_adapter": float(a), "kl_spliced": float(b)}
            for i, (a, b) in enumerate(zip(kl_none.tolist(), kl_splice.tolist()))
        ]
        trace += len(mask)
    return pd.DataFrame(rows)


def decoder_scalars(sae: Any, scales: torch.Tensor, latent: int) -> torch.Tensor:
    """A latent's decoder direction in adapter units ``[d_in]``: what one unit of the latent adds to each
    adapter scalar."""
    return (sae.W_dec[latent].detach() * scales).cpu()


class LatentFeatures:
    """The SAE's latents on the adapter state as ``interp`` features, encoded block by block from the
    input features (``store.features()``), so that a 10M-token store never becomes a dense [tokens, d_sae]
    array; ``columns`` picks latents (all by default); ``chunk`` tokens are encoded at a time."""

    def __init__(
        self, sae: Any, scales: torch.Tensor, inputs: Any, columns: Sequence[int] | None = None, chunk: int = 8192
    ) -> None:
        self.sae, self.scales, self.inputs, self.chunk = sae, scales, inputs, chunk
        self.columns = None if columns is None else np.asarray(columns, dtype=np.int64)
        self.names = [f"latent {i}" for i in (range(sae.cfg.d_sae) if columns is None else self.columns)]

    @torch.no_grad()
    def _encode(self, x: np.ndarray) -> np.ndarray:
        z = encode(self.sae, self.scales, torch.from_numpy(np.asarray(x, dtype=np.float32))).cpu().numpy()
        return z if self.columns is None else z[:, self.columns]

    def blocks(self) -> Iterator[np.ndarray]:
        for block in self.inputs.blocks():
            for i in range(0, len(block), self.chunk):  # [chunk, d_sae] at a time: 117 MB at 3,584 latents
                yield self._encode(block[i : i + self.chunk])

    def rows(self, start: int, end: int) -> np.ndarray:
        return self._encode(self.inputs.rows(start, end))


def latent_summary(sae: Any, scales: torch.Tensor, inputs: Any, k: int = 32, bins: int = 30) -> dict[str, np.ndarray]:
    """Per latent, in two streamed passes over the adapter state (``inputs``: features, e.g.
    ``store.features()``): how many tokens it fires on (``fired``), its summed activation (``mass``), its
    exact top-k (``top_values``, ``top_indices``, ``[d_sae, k]``) and a histogram of its non-zero
    activations (``hist_counts`` ``[d_sae, bins]`` over ``hist_edges`` ``[d_sae, bins + 1]``, from 0 to its
    maximum)."""
    from paper_lib.interp import top_k_streaming

    d_sae = sae.cfg.d_sae
    fired, mass = np.zeros(d_sae, np.int64), np.zeros(d_sae)
    latent_features = LatentFeatures(sae, scales, inputs)

    def first_pass() -> Iterator[np.ndarray]:
        for z in latent_features.blocks():
            fired[:] += (z > 0).sum(0)
            mass[:] += z.sum(0, dtype=np.float64)
            yield z

    top_values, top_indices = top_k_streaming(first_pass(), k)
    top = np.where(top_values[:, 0] > 0, top_values[:, 0], 1.0)
    edges = np.linspace(0, 1, bins + 1)[None, :] * top[:, None]
    counts = np.zeros(d_sae * bins, np.int64)
    for z in latent_features.blocks():
        active = z > 0
        slots = np.clip((z[active] / top[np.nonzero(active)[1]] * bins).astype(np.int64), 0, bins - 1)
        counts += np.bincount(np.nonzero(active)[1] * bins + slots, minlength=d_sae * bins)
    counts = counts.reshape(d_sae, bins)
    return {
        "fired": fired,
        "mass": mass,
        "top_values": top_values,
        "top_indices": top_indices,
        "hist_counts": counts,
        "hist_edges": edges,
    }


@torch.no_grad()
def decoder_logit_effects(
    model: torch.nn.Module,
    direction: torch.Tensor,
    layers: Sequence[int],
    modules: Sequence[str],
    tokenizer: Any,
    top: int = 8,
    adapter: str = "default",
) -> list[tuple[str, float]]:
    """The tokens whose logits a latent's decoder direction (``[n_layers * n_modules]`` adapter scalars)
    raises most through the direct path: the o_proj and down_proj updates (scale · a · B, written to the
    residual stream) summed and read through the final norm's weight and the unembedding."""
    adapters = find_adapters(model, adapter)
    direction = direction.reshape(len(layers), len(modules))
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    unembed = base.lm_head.weight  # [vocab, hidden]; layers may sit on other GPUs (device_map="auto")
    residual = None
    for (layer, module), lora in adapters.items():
        if module not in ("o_proj", "down_proj"):
            continue
        b = lora.lora_B[adapter].weight[:, 0].to(unembed.device, torch.float32) * lora.scaling[adapter]
        term = float(direction[layers.index(layer), modules.index(module)]) * b
        residual = term if residual is None else residual + term
    if residual is None:
        return []
    # in the unembedding's own dtype: a float32 copy of a 152k x 5,120 matrix is 3 GB per latent
    read = (base.model.norm.weight.to(unembed.device, torch.float32) * residual).to(unembed.dtype)
    logits = (unembed @ read).float()
    values, ids = logits.topk(top)
    return [(tokenizer.decode([int(i)]), float(v)) for v, i in zip(values, ids)]


def splice_summary(per_trace: Any, n_resamples: int = 2000, seed: int = 0) -> tuple[Any, float, float, float]:
    """From ``splice_kl``'s per-trace KLs: a table of the mean KL without the adapter and with the SAE
    spliced in (95% bootstrap intervals over traces), and the fraction of the adapter's effect the splice
    keeps, 1 - KL(spliced) / KL(no adapter), with its paired bootstrap interval."""
    import pandas as pd

    from paper_lib.statistics import bootstrap_interval

    spliced, none = per_trace.kl_spliced.to_numpy(), per_trace.kl_no_adapter.to_numpy()
    recovered = 1 - spliced.mean() / none.mean()
    lo, hi = bootstrap_interval([spliced, none], lambda s, n: 1 - s.mean() / n.mean(), n_resamples, seed=seed)
    kl = pd.DataFrame(
        [
            {
                "variant": name,
                "kl": x.mean(),
                **dict(zip(("lo", "hi"), bootstrap_interval(x, n_resamples=n_resamples, seed=seed))),
            }
            for name, x in (("no adapter", none), ("SAE spliced", spliced))
        ]
    )
    return kl, recovered, lo, hi
