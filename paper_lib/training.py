"""SFT with TRL: the paper's rank-1 LoRA recipe and the full fine-tune it is measured against.

One typed config builds both TRL's ``SFTConfig`` and PEFT's ``LoraConfig``; ``lora=None`` is the full
fine-tune. The defaults are the paper's real-scale recipe (jnward/s1_peft ``train/sft_lora.sh``):
r=1, alpha=16, rsLoRA, no dropout, q/k/v/o/gate/up/down in every layer; lr 1e-3, 5 epochs, cosine,
warmup 0.05, weight decay 1e-4, AdamW betas (0.9, 0.95), global batch 16, bf16, non-reentrant
gradient checkpointing, 20,000-token blocks, loss on the completion only. The organism overrides a
few of them through notebook parameters.

Multi-GPU runs go through ``accelerate launch -m paper_lib.training --config run.json`` (see
``launch_training``), the same code path as a single process.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from peft import LoraConfig, PeftModel
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PretrainedConfig, PreTrainedModel

from paper_lib.config import (
    Config,
    ConfigError,
    describe_differences,
    differences,
    fingerprint,
    require,
    seed_everything,
)
from paper_lib.data import TRACE_FIELDS, build_sft_dataset, load_traces
from paper_lib.formats import ALL_MODULES, MODULE_SETS
from paper_lib.paths import artifact_dir, data_dir, resolve, write_text_atomically

log = logging.getLogger(__name__)

FINAL_SUBDIR = "final"
CHECKPOINT_SUBDIR = "checkpoints"


@dataclasses.dataclass(frozen=True)
class LoraSpec(Config):
    """Which adapters, and their shape. Layers: all (default), explicit ``layers``, or a range with stride."""

    r: int = 1
    alpha: float = 16.0
    use_rslora: bool = True
    dropout: float = 0.0
    modules: tuple[str, ...] = ALL_MODULES
    layers: tuple[int, ...] | None = None
    layer_start: int | None = None
    layer_end: int | None = None  # exclusive
    layer_stride: int = 1

    def validate(self) -> None:
        require(self.r >= 1, "r", f"must be >= 1, got {self.r}")
        require(self.alpha > 0, "alpha", f"must be positive, got {self.alpha}")
        require(0.0 <= self.dropout < 1.0, "dropout", "must lie in [0, 1)")
        require(len(self.modules) > 0, "modules", "needs at least one module")
        unknown = set(self.modules) - set(ALL_MODULES)
        require(not unknown, "modules", f"unknown {sorted(unknown)}; choose from {ALL_MODULES}")
        require(self.layer_stride >= 1, "layer_stride", "must be >= 1")
        ranged = self.layer_start is not None or self.layer_end is not None or self.layer_stride != 1
        require(not (self.layers is not None and ranged), "layers", "give explicit layers or a range, not both")
        if self.layers is not None:
            require(len(self.layers) > 0 and min(self.layers) >= 0, "layers", "must be non-empty, non-negative")

    @property
    def scale(self) -> float:
        """The factor on B·A·x: alpha/sqrt(r) with rsLoRA (16 at r=1), else alpha/r."""
        return self.alpha / math.sqrt(self.r) if self.use_rslora else self.alpha / self.r

    def layer_indices(self, n_layers: int) -> list[int] | None:
        """Adapted layer indices, or None for all layers."""
        if self.layers is not None:
            bad = [i for i in self.layers if i >= n_layers]
            require(not bad, "layers", f"{bad} out of range for a model with {n_layers} layers")
            return sorted(set(self.layers))
        if self.layer_start is None and self.layer_end is None and self.layer_stride == 1:
            return None
        start = self.layer_start or 0
        end = n_layers if self.layer_end is None else self.layer_end
        require(0 <= start < end <= n_layers, "layer_start", f"range [{start}, {end}) invalid for {n_layers} layers")
        return list(range(start, end, self.layer_stride))


def lora_spec_for(modules: str = "all", **kwargs: Any) -> LoraSpec:
    """A LoraSpec by module-set name: ``all``, ``attention`` or ``mlp``."""
    if modules not in MODULE_SETS:
        raise ConfigError(f"modules: unknown set {modules!r}; choose from {sorted(MODULE_SETS)}")
    return LoraSpec(modules=MODULE_SETS[modules], **kwargs)


LAYER_THIRDS = ("early", "middle", "late")


def layer_subset(text: str, num_layers: int) -> dict[str, Any]:
    """``LoraSpec`` layer fields from a notebook parameter: ``all``; a third of the model (``early``,
    ``middle``, ``late``); a range ``start:end`` or ``start:end:stride`` (end exclusive); or indices
    ``i,j,k``. Checked against the model's ``num_layers``."""
    text = text.strip().lower()
    try:
        if text == "all":
            return {}
        if text in LAYER_THIRDS:
            third = np.array_split(np.arange(num_layers), 3)[LAYER_THIRDS.index(text)]
            return {"layer_start": int(third[0]), "layer_end": int(third[-1]) + 1}
        if ":" in text:
            parts = [int(p) for p in text.split(":")]
            if len(parts) not in (2, 3) or not 0 <= parts[0] < parts[1] <= num_layers or (len(parts) == 3 and parts[2] < 1):
                raise ValueError
            return {"layer_start": parts[0], "layer_end": parts[1], **({"layer_stride": parts[2]} if len(parts) == 3 else {})}
        layers = tuple(sorted({int(p) for p in text.split(",")}))
        if not layers or layers[0] < 0 or layers[-1] >= num_layers:
            raise ValueError
        return {"layers": layers}
    except ValueError:
        raise ConfigError(
            f"layers: {text!r} is not all, early, middle, late, start:end[:stride] or i,j,k within the "
            f"model's {num_layers} layers"
        ) from None


def lora_run_label(spec: LoraSpec, modules: str = "all") -> str:
    """A run folder and result label that says what the adapter is: ``rank1`` for the paper's (every module,
    every layer), else e.g. ``rank4``, ``rank1_mlp``, ``rank1_L16-23`` (layers 16 to 23, both adapted),
    ``rank1_L0-60s4`` (every fourth), ``rank1_L3,7``."""
    label = f"rank{spec.r}" + ("" if modules == "all" else f"_{modules}")
    if spec.layers is not None:
        label += "_L" + ",".join(str(layer) for layer in spec.layers)
    elif spec.layer_start is not None or spec.layer_end is not None:
        start, stride = spec.layer_start or 0, spec.layer_stride
        # the last adapted layer (a range's end is exclusive, a folder name's is not)
        last = "end" if spec.layer_end is None else start + (spec.layer_end - 1 - start) // stride * stride
        label += f"_L{start}-{last}" + (f"s{stride}" if stride != 1 else "")
    return label


def adapter_variants(
    reference: TrainConfig, out_dir: str, ranks: str = "", layers: str = "", modules: str = "", seeds: str = ""
) -> dict[str, tuple[str, TrainConfig]]:
    """The comparison's adapters: ``label -> (kind, TrainConfig)``, each ``reference``'s recipe with one thing
    changed: a rank, a layer subset (``layer_subset``), a module set, or the training seed (comma-separated
    lists). The reference keeps its own label (``rank1``; kind ``seed``: its seed is one of those compared)."""
    num_layers = AutoConfig.from_pretrained(reference.model).num_hidden_layers
    base = reference.lora or LoraSpec()
    out = {lora_run_label(base): ("seed", reference)}

    def add(kind: str, label: str, **changes: Any) -> None:
        if label not in out:
            out[label] = (kind, dataclasses.replace(reference, output_dir=f"{out_dir}/{label}", **changes))

    for r in (int(x) for x in ranks.split(",") if x.strip()):
        spec = dataclasses.replace(base, r=r)
        add("rank", lora_run_label(spec), lora=spec)
    for subset in (x.strip() for x in layers.split(",") if x.strip()):
        spec = LoraSpec(
            r=base.r, alpha=base.alpha, use_rslora=base.use_rslora, modules=base.modules, **layer_subset(subset, num_layers)
        )
        add("layers", lora_run_label(spec), lora=spec)
    for name in (x.strip() for x in modules.split(",") if x.strip()):
        spec = lora_spec_for(name, r=base.r, alpha=base.alpha, use_rslora=base.use_rslora)
        add("modules", lora_run_label(spec, name), lora=spec)
    for seed in (int(x) for x in seeds.split(",") if x.strip()):
        if seed != reference.seed:
            add("seed", f"{lora_run_label(base)}_seed{seed}", seed=seed)
    return out


def build_lora_config(spec: LoraSpec, model_config: PretrainedConfig) -> LoraConfig:
    """PEFT's LoraConfig for ``spec`` on a model with ``model_config``."""
    return LoraConfig(
        r=spec.r,
        lora_alpha=spec.alpha,
        use_rslora=spec.use_rslora,
        lora_dropout=spec.dropout,
        bias="none",
        target_modules=list(spec.modules),
        layers_to_transform=spec.layer_indices(model_config.num_hidden_layers),
        task_type="CAUSAL_LM",
    )


def count_lora_parameters(spec: LoraSpec, model_config: PretrainedConfig) -> int:
    """Trainable parameters of ``spec`` on a Qwen2-style model: r·(d_in + d_out) per adapted projection."""
    hidden = model_config.hidden_size
    head_dim = getattr(model_config, "head_dim", None) or hidden // model_config.num_attention_heads
    q_out = model_config.num_attention_heads * head_dim
    kv_out = model_config.num_key_value_heads * head_dim
    inter = model_config.intermediate_size
    dims = {
        "q_proj": (hidden, q_out),
        "k_proj": (hidden, kv_out),
        "v_proj": (hidden, kv_out),
        "o_proj": (q_out, hidden),
        "gate_proj": (hidden, inter),
        "up_proj": (hidden, inter),
        "down_proj": (inter, hidden),
    }
    layers = spec.layer_indices(model_config.num_hidden_layers)
    n_layers = model_config.num_hidden_layers if layers is None else len(layers)
    return n_layers * sum(spec.r * sum(dims[m]) for m in spec.modules)


@dataclasses.dataclass(frozen=True)
class TrainConfig(Config):
    """One SFT run. Defaults: the paper's real-scale rank-1 recipe."""

    model: str = "Qwen/Qwen2.5-32B-Instruct"
    dataset: str = "simplescaling/s1K-1.1"
    output_dir: str = "runs/01_train/rank1"  # relative: under paths.data_dir()
    lora: LoraSpec | None = dataclasses.field(default_factory=LoraSpec)  # None: full fine-tune
    learning_rate: float = 1e-3
    epochs: float = 5.0
    lr_scheduler: str = "cosine"
    warmup_ratio: float = 0.05
    weight_decay: float = 1e-4
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    global_batch_size: int = 16
    per_device_batch_size: int = 1
    max_length: int = 20000
    bf16: bool = True
    gradient_checkpointing: bool = True
    use_liger_kernel: bool = False
    seed: int = 42
    logging_steps: int = 1
    save_steps: int = 50  # checkpoints for resuming; the last two are kept
    resume: bool = False  # resume from the newest checkpoint in output_dir/checkpoints

    def validate(self) -> None:
        require(self.learning_rate > 0, "learning_rate", "must be positive")
        require(self.epochs > 0, "epochs", "must be positive")
        require(0 <= self.warmup_ratio < 1, "warmup_ratio", "must lie in [0, 1)")
        require(self.weight_decay >= 0, "weight_decay", "must be >= 0")
        require(0 <= self.adam_beta1 < 1 and 0 <= self.adam_beta2 < 1, "adam_beta2", "betas must lie in [0, 1)")
        require(self.global_batch_size >= 1, "global_batch_size", "must be >= 1")
        require(self.per_device_batch_size >= 1, "per_device_batch_size", "must be >= 1")
        require(self.max_length >= 16, "max_length", "must be >= 16")
        require(self.save_steps >= 1 and self.logging_steps >= 1, "save_steps", "must be >= 1")
        require(bool(self.model) and bool(self.dataset), "model", "model and dataset must be named")

    @property
    def kind(self) -> str:
        return "full" if self.lora is None else f"lora_r{self.lora.r}"

    def gradient_accumulation(self, world_size: int) -> int:
        """Accumulation steps that make per-device batch x accumulation x world size = global batch, exactly."""
        per_step = self.per_device_batch_size * world_size
        if world_size < 1 or self.global_batch_size % per_step:
            raise ConfigError(
                f"global_batch_size: {self.global_batch_size} is not a multiple of per_device_batch_size "
                f"({self.per_device_batch_size}) x world size ({world_size}); change one of them"
            )
        return self.global_batch_size // per_step

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        data = dict(data)
        lora = data.pop("lora", None)
        cfg = super().from_dict(data)
        return dataclasses.replace(cfg, lora=None if lora is None else LoraSpec.from_dict(lora))


def world_size() -> int:
    """Processes in this run (``accelerate launch``/torchrun set WORLD_SIZE)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def build_sft_config(cfg: TrainConfig, n_processes: int | None = None):
    """TRL's SFTConfig for ``cfg``. The dataset is prompt-completion, so the loss is on the completion only."""
    from trl import SFTConfig

    out = artifact_dir(cfg.output_dir)
    return SFTConfig(
        output_dir=str(out / CHECKPOINT_SUBDIR),
        num_train_epochs=cfg.epochs,
        learning_rate=cfg.learning_rate,
        lr_scheduler_type=cfg.lr_scheduler,
        warmup_steps=cfg.warmup_ratio,  # a float < 1 is a ratio of the total steps
        weight_decay=cfg.weight_decay,
        adam_beta1=cfg.adam_beta1,
        adam_beta2=cfg.adam_beta2,
        optim="adamw_torch",
        per_device_train_batch_size=cfg.per_device_batch_size,
        gradient_accumulation_steps=cfg.gradient_accumulation(n_processes or world_size()),
        bf16=cfg.bf16,
        gradient_checkpointing=cfg.gradient_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False},
        use_liger_kernel=cfg.use_liger_kernel,
        max_length=cfg.max_length,
        truncation_mode="keep_start",
        packing=False,
        completion_only_loss=True,
        seed=cfg.seed,
        data_seed=cfg.seed,
        logging_steps=cfg.logging_steps,
        save_strategy="steps",
        save_steps=cfg.save_steps,
        save_total_limit=2,
        report_to="none",
        dataloader_num_workers=0,
        disable_tqdm=os.environ.get("TQDM_DISABLE") == "1",  # a notebook's run: progress to its log, not the page
        use_cpu=not torch.cuda.is_available(),  # also lets transformers accept bf16 (autocast) on a CPU
    )


def load_base_model(name: str, bf16: bool) -> tuple[PreTrainedModel, Any]:
    """Model and tokenizer by hub id or path; a clear error when that fails."""
    try:
        tokenizer = AutoTokenizer.from_pretrained(name)
        model = AutoModelForCausalLM.from_pretrained(name, dtype=torch.bfloat16 if bf16 else torch.float32)
    except (OSError, ValueError) as err:
        raise FileNotFoundError(f"could not load model {name!r}: {err}") from err
    return model, tokenizer


def check_target_modules(model: PreTrainedModel, spec: LoraSpec) -> None:
    """Refuse a model that lacks any of the projections the LoRA targets (before PEFT's own deep error)."""
    names = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    missing = [m for m in spec.modules if m not in names]
    if missing:
        raise ConfigError(f"lora.modules: the model has no {missing} linear layers (it has {sorted(names)})")


def train(cfg: TrainConfig, overwrite: bool = False) -> dict[str, Any]:
    """Run SFT for ``cfg``; writes ``final/`` (adapter or model + tokenizer), ``config.json``,
    ``log_history.csv`` and ``stats.json`` under the output folder. Skips if ``final/`` exists."""
    from trl import SFTTrainer

    out = artifact_dir(cfg.output_dir)
    final = out / FINAL_SUBDIR
    traces = load_traces(cfg.dataset)
    data_fingerprint = traces_fingerprint(traces)
    base_weights = model_fingerprint(cfg.model)  # hashed once here (a cached digest beside the weights after)
    finished = finished_run(cfg, data_fingerprint, overwrite, base_weights)
    if finished is not None:
        return finished
    seed_everything(cfg.seed)
    # The training arguments set up the distributed state first: under FSDP with cpu_ram_efficient_loading
    # transformers then reads the weights on rank 0 alone (the others on the meta device, filled by FSDP's
    # sync_module_states), ~64 GB of host memory at 32B instead of 64 GB a process.
    args = build_sft_config(cfg)
    model, tokenizer = load_base_model(cfg.model, cfg.bf16)
    peft_config = None
    if cfg.lora is not None:
        check_target_modules(model, cfg.lora)
        peft_config = build_lora_config(cfg.lora, model.config)
    dataset, data_stats = build_sft_dataset(traces, tokenizer, cfg.max_length)
    trainer = SFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer, peft_config=peft_config)
    if args.disable_tqdm:  # without a bar, transformers prints every log row instead: they are in log_history.csv
        from transformers.trainer_callback import PrinterCallback

        trainer.remove_callback(PrinterCallback)
    trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    from transformers.trainer_utils import get_last_checkpoint

    checkpoints = out / CHECKPOINT_SUBDIR
    resume_from = get_last_checkpoint(str(checkpoints)) if cfg.resume and checkpoints.is_dir() else None
    settings = {**cfg.to_dict(), "traces": data_fingerprint, "base_weights": base_weights}
    if resume_from:
        check_resume_settings(checkpoints, settings)
        log.info("resuming from %s", resume_from)
    elif trainer.is_world_process_zero():  # what the checkpoints about to be written were made with
        checkpoints.mkdir(parents=True, exist_ok=True)
        (checkpoints / SETTINGS_FILE).write_text(json.dumps(settings, indent=2, default=str) + "\n")
    start = time.perf_counter()
    result = trainer.train(resume_from_checkpoint=resume_from)
    seconds = time.perf_counter() - start
    save_final_model(trainer, final)
    if trainer.is_world_process_zero():
        tokenizer.save_pretrained(str(final))
        history = pd.DataFrame(trainer.state.log_history)
        history.to_csv(out / "log_history.csv", index=False)
        losses = history["loss"].dropna() if "loss" in history else pd.Series(dtype=float)
        stats = {
            "kind": cfg.kind,
            "trainable_parameters": trainable,
            "optimizer_steps": trainer.state.global_step,
            "train_seconds": seconds,
            "train_tokens": int(trainer.state.num_input_tokens_seen or history.get("num_tokens", pd.Series([0])).max()),
            "final_loss": float(losses.tail(5).mean()) if len(losses) else float("nan"),
            "train_loss": float(result.training_loss),
            "resumed_from": Path(resume_from).name if resume_from else None,
            "data_fingerprint": data_fingerprint,
            "base_weights": base_weights,
            "world_size": trainer.accelerator.num_processes,
            "distributed_type": str(trainer.accelerator.distributed_type).rsplit(".", 1)[-1],
            **{f"data_{k}": v for k, v in data_stats.items()},
        }
        stats["tokens_per_second"] = stats["train_tokens"] / seconds if seconds > 0 else float("nan")
        cfg.save(out)
        (out / "stats.json").write_text(json.dumps(stats, indent=2) + "\n")
        return stats
    return {}


SETTINGS_FILE = "settings.json"  # beside the checkpoints: the config and traces they were trained with


def check_resume_settings(checkpoints: Path, settings: dict[str, Any]) -> None:
    """Refuse to resume from checkpoints trained with other settings or traces (a resumed run would go on
    with the old schedule and record the new values), naming what differs."""
    path = checkpoints / SETTINGS_FILE
    if not path.is_file():
        raise ConfigError(
            f"{checkpoints} holds checkpoints without their {SETTINGS_FILE}, so what they were trained with cannot be "
            "checked: resume is refused; retrain (OVERWRITE True) or choose another OUTPUT_DIR"
        )
    diff = differences(json.loads(path.read_text()), json.loads(json.dumps(settings, default=str)), ignore=("resume",))
    if diff:
        raise ConfigError(
            f"RESUME: the checkpoints in {checkpoints} were trained with other settings ({describe_differences(diff)}); "
            "resume with the same settings, or retrain (OVERWRITE True) or choose another OUTPUT_DIR"
        )


def traces_fingerprint(traces: Any) -> str:
    """A content hash of the training traces (the fields the recipe reads), row order included."""
    return fingerprint([traces[field] for field in TRACE_FIELDS])


def finished_run(
    cfg: TrainConfig, data_fingerprint: str, overwrite: bool = False, base_weights: str | None = None
) -> dict[str, Any] | None:
    """The stats of a finished run of exactly ``cfg`` on the same traces in ``cfg.output_dir`` (training is
    skipped), None when there is none (or ``overwrite``); a finished run of other settings or other
    traces or base weights is refused, naming what differs, so a changed parameter never reports an old
    result. ``base_weights``: the base model's ``model_fingerprint`` where the caller already has it."""
    out = artifact_dir(cfg.output_dir)
    if overwrite or not ((out / FINAL_SUBDIR).is_dir() and (out / "stats.json").is_file()):
        return None
    stats = json.loads((out / "stats.json").read_text())
    try:
        saved = TrainConfig.load(out).to_dict()
    except (FileNotFoundError, ConfigError, TypeError) as err:
        raise ConfigError(
            f"{out} holds a finished run whose config.json cannot be read ({err}); pass "
            "overwrite=True (OVERWRITE True) to retrain, or choose another output_dir"
        ) from err
    diff = differences(saved, cfg.to_dict(), ignore=("resume",))
    if stats.get("data_fingerprint") != data_fingerprint:
        diff["traces"] = (stats.get("data_fingerprint"), data_fingerprint)
    base = base_weights or model_fingerprint(cfg.model)
    if stats.get("base_weights") != base:  # the base's weights changed in place
        diff["base model weights"] = (stats.get("base_weights"), base)
    if diff:
        raise ConfigError(
            f"{out} holds a run trained with other inputs ({describe_differences(diff)}); pass "
            "overwrite=True (OVERWRITE True) to retrain there, or choose another output_dir"
        )
    log.info("%s holds a finished run of these settings; skipping training (overwrite=True retrains)", out)
    return stats


def save_final_model(trainer: Any, final: Path) -> None:
    """Write the trained adapter (or model) to ``final``. Called on *every* process: under FSDP the
    weights are gathered collectively, so a rank-0-only call would hang or, with the configs' sharded
    state dict, save nothing. The switch to a full state dict happens here, after training, so that
    the periodic checkpoints stay sharded (cheap); rank 0 alone writes the files."""
    if getattr(trainer, "is_fsdp_enabled", False):
        trainer.accelerator.state.fsdp_plugin.set_state_dict_type("FULL_STATE_DICT")
    trainer.save_model(str(final))


def read_accelerate_config(path: str | Path) -> dict[str, Any]:
    """An accelerate YAML config (path relative to the repository root allowed), with a clear error."""
    import yaml

    local = resolve(path)
    if not local.is_file():
        raise ConfigError(f"accelerate_config: no such file {path}")
    return yaml.safe_load(local.read_text()) or {}


def launch_environment(accelerate_config: dict[str, Any]) -> dict[str, str]:
    """The environment for ``accelerate launch``. Without a GPU, accelerate 1.15 starts N unrelated
    non-distributed processes (all writing the same folder) unless ``ACCELERATE_USE_CPU`` is set, and it
    runs FSDP only on accelerators (its FSDP plugin asks for a device), so FSDP without one is refused."""
    env = dict(os.environ)
    if torch.cuda.is_available():
        return env
    if str(accelerate_config.get("distributed_type", "")).upper() == "FSDP":
        raise ConfigError(
            "accelerate_config: FSDP needs GPUs (accelerate runs FSDP only on accelerators); on a "
            "CPU use paper_lib/accelerate_configs/multi_cpu.yaml"
        )
    env["ACCELERATE_USE_CPU"] = "1"  # gloo data parallelism: the same launch, rank and save path as on GPUs
    return env


def launch_training(
    cfg: TrainConfig, num_processes: int = 1, accelerate_config: str | None = None, overwrite: bool = False
) -> dict[str, Any]:
    """Train in this process (one device) or through ``accelerate launch`` (several GPUs, FSDP)."""
    if num_processes <= 1 and accelerate_config is None:
        return train(cfg, overwrite=overwrite)
    finished = finished_run(cfg, traces_fingerprint(load_traces(cfg.dataset)), overwrite)
    if finished is not None:  # decided here, so a refusal is a clear error, not a failed launch
        return finished
    settings = read_accelerate_config(accelerate_config) if accelerate_config else {}
    env = launch_environment(settings)
    out = artifact_dir(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    config_path = out / "launch_config.json"
    config_path.write_text(json.dumps(cfg.to_dict(), indent=2) + "\n")
    command = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(num_processes)]
    if accelerate_config:
        command += ["--config_file", str(resolve(accelerate_config))]
    command += ["-m", "paper_lib.training", "--config", str(config_path)] + (["--overwrite"] if overwrite else [])
    log.info("launching: %s", " ".join(command))
    subprocess.run(command, check=True, env=env)
    stats_path = out / "stats.json"
    if not stats_path.is_file() or not (out / FINAL_SUBDIR).is_dir():
        raise RuntimeError(f"accelerate launch finished but wrote no trained run to {out} (no stats.json/final/)")
    return json.loads(stats_path.read_text())


def resolve_device(device: str | None) -> str:
    """``auto``: every GPU (``device_map="auto"`` spreads a large model over them) or the CPU; else as given."""
    if device in (None, "auto"):
        return "auto" if torch.cuda.is_available() else "cpu"
    return device


def load_trained(
    run_dir: str | Path, dtype: torch.dtype = torch.float32, device: str | None = "cpu"
) -> tuple[PreTrainedModel, Any, TrainConfig]:
    """A trained run by folder: the base model with the adapter attached (unmerged), or the full model.

    The weights go straight to ``device`` in ``dtype`` (``auto``: spread over the GPUs), never through a
    full-precision copy on the host."""
    run_dir = artifact_dir(run_dir)
    final = run_dir / FINAL_SUBDIR
    if not final.is_dir():
        raise FileNotFoundError(f"no trained model at {final}; run notebooks/01_train_rank1_lora.py first")
    cfg = TrainConfig.load(run_dir)
    tokenizer = AutoTokenizer.from_pretrained(str(final))
    device_map = resolve_device(device)
    if (final / "adapter_config.json").is_file():
        check_adapter(final, cfg.model)
        base = AutoModelForCausalLM.from_pretrained(cfg.model, dtype=dtype, device_map=device_map)
        # adapters in the model's dtype for inference: PEFT's float32 default makes [tokens, intermediate]
        # float32 temporaries on the LoRA path (~40 GiB at 32B for a 131k-token batch)
        model = PeftModel.from_pretrained(base, str(final), autocast_adapter_dtype=False)
    else:
        model = AutoModelForCausalLM.from_pretrained(str(final), dtype=dtype, device_map=device_map)
    model.eval()
    return model, tokenizer, cfg


class AdapterError(ValueError):
    """A saved adapter that does not fit its base model, or cannot be read."""


_LAYER_INDEX = re.compile(r"\.layers\.(\d+)\.")


def check_adapter(adapter_dir: str | Path, base_model: str) -> None:
    """Refuse, before any work, an adapter that does not fit ``base_model``: recorded base, every
    ``lora_A``/``lora_B`` shape against its projection's input and output width, every layer index, the
    rank in ``adapter_config.json``, finite weights, readable files (errors name the file). The base is
    built on the meta device from its config, so the check costs nothing at 32B."""
    from safetensors import SafetensorError, safe_open
    from transformers import AutoConfig

    adapter_dir = Path(adapter_dir)
    config_path = adapter_dir / "adapter_config.json"
    weights = adapter_dir / "adapter_model.safetensors"
    if not config_path.is_file():
        raise AdapterError(f"no PEFT adapter at {adapter_dir} (adapter_config.json missing)")
    try:
        adapter_config = json.loads(config_path.read_text())
    except json.JSONDecodeError as err:
        raise AdapterError(f"{config_path} is not valid JSON: {err}") from err
    recorded = adapter_config.get("base_model_name_or_path") or ""  # PEFT writes null for a model built from a config
    same = (
        not recorded  # the adapter names no base: its shapes, checked below, are all there is to check
        or recorded == base_model
        or (Path(recorded).exists() and resolve(recorded).resolve() == resolve(base_model).resolve())
    )
    if not same:
        raise AdapterError(f"adapter {adapter_dir} was trained on {recorded!r}, not on {base_model!r}")
    local = resolve(base_model)
    config = AutoConfig.from_pretrained(str(local) if local.exists() else base_model)
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config)
    linears = {name: m for name, m in skeleton.named_modules() if isinstance(m, torch.nn.Linear)}
    rank = int(adapter_config.get("r", 0))
    try:
        with safe_open(str(weights), "pt") as handle:
            keys = list(handle.keys())
            if not keys:
                raise AdapterError(f"{weights} holds no tensors")
            for key in keys:
                tensor = handle.get_tensor(key)
                module = key.removeprefix("base_model.model.").split(".lora_")[0]
                if module not in linears:
                    match = _LAYER_INDEX.search(key)
                    where = (
                        f"layer {match.group(1)}, but {base_model} has {config.num_hidden_layers} layers"
                        if match
                        else f"a module {base_model} lacks"
                    )
                    raise AdapterError(f"adapter {adapter_dir}: {key} adapts {where}")
                linear = linears[module]
                expected = (rank, linear.in_features) if ".lora_A." in key else (linear.out_features, rank)
                if tuple(tensor.shape) != expected:
                    raise AdapterError(
                        f"adapter {adapter_dir}: {key} has shape {tuple(tensor.shape)}, but {base_model}'s "
                        f"{module} needs {expected} (rank {rank})"
                    )
                if not torch.isfinite(tensor).all():
                    raise AdapterError(f"adapter {adapter_dir}: {key} holds NaN or infinite weights")
    except (SafetensorError, OSError) as err:
        raise AdapterError(f"cannot read the adapter weights {weights}: {err}") from err


def adapter_weights_hash(adapter_dir: str | Path) -> str:
    """A short hash of an adapter's weights file: a retrained adapter in the same folder is another adapter."""
    import hashlib

    return hashlib.sha256((Path(adapter_dir) / "adapter_model.safetensors").read_bytes()).hexdigest()[:16]


DIGEST_CACHE = ".cache/weights_digests"  # under the data folder: one file a model folder, its weights' hash


def model_fingerprint(model: str | Path) -> str:
    """A content hash of a model's weights (every ``*.safetensors`` / ``*.bin`` file of a local folder, or of
    a hub id's cached snapshot): artifacts made from a model record it, so weights changed in place are
    another model. Cached under the data folder (``DIGEST_CACHE``), keyed by the folder and each file's
    size and modification time, so a 65 GB model is read once; nothing is written beside the weights (a
    run folder stays as its run left it, a hub snapshot as downloaded). A model not found locally (to be
    downloaded) is named by its id."""
    import hashlib

    folder = resolve(model) if resolve(model).is_dir() else _hub_snapshot(str(model))
    if folder is None:
        return f"id:{model}"
    folder = folder.resolve()
    files = sorted(p for p in folder.iterdir() if p.suffix in (".safetensors", ".bin") and p.is_file())
    stamp = [[p.name, p.stat().st_size, p.stat().st_mtime_ns] for p in files]
    cache = data_dir() / DIGEST_CACHE / f"{hashlib.sha256(str(folder).encode()).hexdigest()[:16]}.json"
    if cache.is_file():
        try:
            saved = json.loads(cache.read_text())
            if saved.get("folder") == str(folder) and saved.get("files") == stamp:
                return saved["digest"]
        except (OSError, json.JSONDecodeError, KeyError):
            pass
    digest = hashlib.sha256()
    for path in files:
        with path.open("rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 24), b""):
                digest.update(chunk)
    value = digest.hexdigest()[:16]
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)  # whole or absent: processes may hash one model at once
        write_text_atomically(cache, json.dumps({"folder": str(folder), "files": stamp, "digest": value}) + "\n")
    except OSError:  # a read-only data folder: hashed again next time
        pass
    return value


def _hub_snapshot(model_id: str) -> Path | None:
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(model_id, local_files_only=True))
    except Exception:  # not cached here: the id is all there is to record
        return None


def data_relative(path: str | Path) -> str:
    """A path as recorded in meta files: relative to the data folder when inside it (so a copied or moved
    ``data/runs`` still recognises its own artifacts), else as given."""
    resolved = resolve(path)
    root = data_dir().resolve()
    try:
        return "data:" + str(resolved.resolve().relative_to(root))
    except ValueError:
        return str(path)


def adapter_provenance(run_dir: str | Path) -> dict[str, Any]:
    """What a downstream artifact of a trained run records about it: the base model and the weights' hash."""
    run_dir = artifact_dir(run_dir)
    return {"model": TrainConfig.load(run_dir).model, "adapter_weights": adapter_weights_hash(run_dir / FINAL_SUBDIR)}


def input_device(model: torch.nn.Module) -> torch.device:
    """Where a model's inputs go (its embedding's device, also when it is spread over several GPUs)."""
    return model.get_input_embeddings().weight.device


@contextmanager
def replaced_projections(model: PeftModel, mode: str, merge_dtype: torch.dtype = torch.bfloat16) -> Iterator[None]:
    """Within the context each LoRA projection's output is recomputed as a merged or rounded variant,
    one module at a time (a transient weight of one projection; no copy of the model):

    - ``exact``: x·(W + ΔW) with the merged weight in fp32, the exact merge;
    - ``rounded``: the unmerged projection with W rounded to ``merge_dtype``;
    - ``merged``: x·round(round(W) + ΔW), i.e. ``merge_and_unload`` in ``merge_dtype``.
    """
    import torch.nn.functional as F
    from peft.tuners.lora import Linear as LoraLinear

    if mode not in ("exact", "rounded", "merged"):
        raise ValueError(f"unknown mode {mode!r}")

    def hook(module, args, _output):
        x = args[0]
        weight = module.base_layer.weight
        bias = module.base_layer.bias
        if mode == "exact":
            merged = weight.float() + module.get_delta_weight(module.active_adapters[0]).float()
            out = F.linear(x.float(), merged, None if bias is None else bias.float()).to(x.dtype)
            return out
        rounded = weight.to(merge_dtype)
        if mode == "merged":
            merged = (rounded.float() + module.get_delta_weight(module.active_adapters[0]).float()).to(merge_dtype)
            return F.linear(x, merged.to(x.dtype), bias)
        out = F.linear(x, rounded.to(x.dtype), bias)
        for name in module.active_adapters:
            lora_A, lora_B = module.lora_A[name], module.lora_B[name]
            out = out + (lora_B(lora_A(x.to(lora_A.weight.dtype))) * module.scaling[name]).to(out.dtype)
        return out

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, LoraLinear)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


@torch.no_grad()
def update_fraction_lost(model: PeftModel, merge_dtype: torch.dtype = torch.bfloat16) -> float:
    """Mean over adapted projections of |round(round(W) + ΔW) - round(W) - ΔW| / |ΔW|: how much of each
    update B·A a merge in ``merge_dtype`` rounds away (one module's weight in fp32 at a time)."""
    from peft.tuners.lora import Linear as LoraLinear

    lost = []
    for module in model.modules():
        if isinstance(module, LoraLinear):
            rounded = module.base_layer.weight.to(merge_dtype).float()
            delta = module.get_delta_weight(module.active_adapters[0]).float()
            effective = (rounded + delta).to(merge_dtype).float() - rounded
            lost.append(((effective - delta).norm() / delta.norm().clamp_min(1e-30)).item())
    return float(sum(lost) / len(lost)) if lost else float("nan")


@torch.no_grad()
def merge_error(
    model: PeftModel, tokenizer: Any, texts: list[str], max_length: int = 256, merge_dtype: torch.dtype = torch.bfloat16
) -> dict[str, float]:
    """How exact merging the adapter into the base weights is: exactly (fp32 merged weights) and in
    ``merge_dtype`` (the authors' bf16 merge), each against the unmerged model.

    Runs where the model is, in its dtype, on ``texts`` truncated to ``max_length`` tokens, with no copy
    of the model (``replaced_projections``). For the bf16 merge the reference has its base weights
    rounded too, so the only difference is the merge itself; also the mean fraction of each update B·A
    lost to rounding. Errors are absolute and relative logit errors and probability errors: the
    absolute logit error of an exact merge scales with the logits (accumulation order)."""
    tokenizer.padding_side = "right"
    batch = tokenizer(texts, return_tensors="pt", padding=True, truncation=True, max_length=max_length, add_special_tokens=False)
    return merge_error_on_batch(model, dict(batch), merge_dtype)


@torch.no_grad()
def merge_error_on_batch(
    model: PeftModel, batch: dict[str, torch.Tensor], merge_dtype: torch.dtype = torch.bfloat16
) -> dict[str, float]:
    """``merge_error`` on a tokenized batch (input_ids, attention_mask), moved to the model's device."""
    batch = {k: v.to(input_device(model)) for k, v in batch.items()}
    mask = batch["attention_mask"].bool()
    model.eval()
    reference = model(**batch).logits
    with replaced_projections(model, "exact"):
        exact = compare_logits(model(**batch).logits, reference, mask)
    del reference
    with replaced_projections(model, "rounded", merge_dtype):
        reference16 = model(**batch).logits
    with replaced_projections(model, "merged", merge_dtype):
        merged16 = compare_logits(model(**batch).logits, reference16, mask)
    del reference16
    tag = str(merge_dtype).rsplit(".", 1)[-1].replace("bfloat16", "bf16")
    return {
        **{f"fp32_{k}": v for k, v in exact.items()},
        **{f"{tag}_{k}": v for k, v in merged16.items()},
        f"{tag}_update_fraction_lost": update_fraction_lost(model, merge_dtype),
    }


def compare_logits(logits: torch.Tensor, reference: torch.Tensor, mask: torch.Tensor) -> dict[str, float]:
    """Max absolute and relative (to the largest reference logit) logit error, and max probability error,
    over the unmasked positions, in fp32."""
    logits, reference = logits[mask].float(), reference[mask].float()
    diff = (logits - reference).abs().max()
    prob = (logits.softmax(-1) - reference.softmax(-1)).abs().max()
    return {
        "max_abs_logit_error": diff.item(),
        "max_rel_logit_error": (diff / reference.abs().max()).item(),
        "max_abs_prob_error": prob.item(),
    }


def main(argv: list[str] | None = None) -> None:
    import argparse

    parser = argparse.ArgumentParser(description="SFT run from a TrainConfig JSON (used by accelerate launch)")
    parser.add_argument("--config", required=True)
    parser.add_argument("--overwrite", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    train(TrainConfig.from_dict(json.loads(Path(args.config).read_text())), overwrite=args.overwrite)


if __name__ == "__main__":
    main()


@torch.no_grad()
def completion_loss(model: torch.nn.Module, batches: Iterable[dict[str, torch.Tensor]]) -> tuple[float, int]:
    """(mean NLL in nats per token, tokens) of the completion tokens of ``batches`` (``data.completion_batches``:
    ``score_mask`` marks the positions that predict a completion token), teacher-forced: the held-out
    counterpart of the training loss."""
    total, count = 0.0, 0
    device = input_device(model)
    for batch in batches:
        ids = batch["input_ids"].to(device)
        mask = batch["score_mask"][:, :-1].to(device).bool()
        logits = model(input_ids=ids, attention_mask=batch["attention_mask"].to(device), use_cache=False).logits[:, :-1]
        total += float(torch.nn.functional.cross_entropy(logits[mask].float(), ids[:, 1:][mask], reduction="sum"))
        count += int(mask.sum())
    return total / max(count, 1), count
