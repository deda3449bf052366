"""Stage configs: a dataclass per concern, read from YAML, with ``--set a.b=value`` overrides."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import yaml

from training.compute import ComputeConfig
from training.degradations import DegradationConfig

ConfigT = TypeVar("ConfigT")
CONFIG_FILE = "config.yaml"  # the effective config, saved in a stage's out_dir


@dataclass
class DataConfig:
    """Where the photos are and how they are corrupted. Sigmas are on the 0-255 scale."""

    train_dir: str = "../shared/data/photos/train"
    val_dir: str = "../shared/data/photos/val"
    # AWGN's sigma range; the other kinds of noise, and how often each is drawn, are in ``degradations``.
    sigma_min: float = 0.0
    sigma_max: float = 55.0
    quantize: bool = True
    degradations: DegradationConfig = field(default_factory=DegradationConfig)
    val_sigmas: list[float] = field(default_factory=lambda: [15.0, 25.0, 50.0])
    # Validation inputs beyond AWGN at ``val_sigmas``: names of ``training.degradations.EVAL_DEGRADATIONS``.
    val_degradations: list[str] = field(default_factory=list)
    val_crop: int = 256
    val_seed: int = 1234
    # Validation views per photo: 1.0 the photo itself, 0.5 downscaled to half its sides (photo-like texture).
    val_scales: list[float] = field(default_factory=lambda: [1.0])
    # Training crops: random scale in this range, and the most textured of this many candidates.
    scale_range: list[float] = field(default_factory=lambda: [1.0, 1.0])
    texture_candidates: int = 1


@dataclass
class SandwichLoss:
    """The loss of a sandwich step (stage 1, and stage 2's fine-tune): the widest against the clean image,
    every other member against the clean image and the widest's detached output."""

    distill_weight: float = 1.0
    # The widest's loss counts this many times in the step's gradient (each other member's counts once).
    # Above 1 it shifts the shared weights toward the widest, which is `best` and the members' teacher.
    widest_weight: float = 1.0
    # "l1": batch-mean L1. "log_mse": mean over images of log(MSE + eps), i.e. every image's PSNR counts
    # the same whatever its sigma, so low-noise inputs are not drowned by high-noise ones.
    loss: str = "log_mse"
    log_mse_eps: float = 1e-6
    grad_clip: float = 1.0


@dataclass
class RunOptions:
    """What every stage takes besides its own settings."""

    # The name of the recipe this run belongs to (e.g. "ddsnet-color"), recorded in the checkpoint's provenance.
    recipe: str = ""
    # Device, bf16 autocast, channels-last and batch workers (see ``training.compute``).
    compute: ComputeConfig = field(default_factory=ComputeConfig)


@dataclass
class Schedule:
    """Stage 1's schedule, which the static baselines train on too."""

    steps: int = 3000
    # [fraction of training at which it starts, crop side, batch size]
    crop_schedule: list[list[float]] = field(default_factory=lambda: [[0.0, 64, 16], [0.5, 96, 12], [0.8, 128, 8]])
    lr: float = 5e-4
    lr_min: float = 1e-6
    warmup_steps: int = 100
    ema_decay: float = 0.999
    log_every: int = 10
    seed: int = 0


@dataclass
class SupernetStage(RunOptions, Schedule, SandwichLoss):
    """Stage 1: sandwich-rule training with in-place distillation."""

    out_dir: str = "runs/supernet"
    model: dict = field(default_factory=dict)
    data: DataConfig = field(default_factory=DataConfig)
    random_widths: int = 2
    val_every: int = 250
    save_every: int = 50
    max_minutes: float = 0.0  # > 0: save and stop after this long, to be continued with --resume
    stop_at: int = 0  # > 0: save and stop after this step, to be continued with --resume
    init_from: str = ""  # a ddsnet checkpoint whose supernet weights start a fresh (non --resume) run


@dataclass
class TailorStage(RunOptions, SandwichLoss):
    """Stage 2: greedy progressive channel tailoring (AutoSlim), then optionally a short fine-tune."""

    supernet: str = "runs/supernet/supernet.safetensors"
    out_dir: str = "runs/tailor"
    data: DataConfig = field(default_factory=DataConfig)
    search_crop: int = 128
    search_sigmas: list[float] = field(default_factory=lambda: [15.0, 25.0, 50.0])
    # FLOPs fractions of the widest at which a sub-network is recorded (the widest itself is always first).
    targets: list[float] = field(default_factory=lambda: [0.7, 0.598, 0.45, 0.25])
    # "psnr": keep the cut that loses the least PSNR (AutoSlim); "psnr_per_flop": least loss per FLOP saved.
    criterion: str = "psnr"
    # False: skip the search and keep the K configurations in ``supernet``'s own table (a tailored or gated
    # checkpoint), so that a fine-tune can continue on the configurations already shipped.
    search: bool = True
    # With ``search: false``, the K configurations to fine-tune and tabulate instead of ``supernet``'s own
    # table: per-group channel lists, widest first, FLOPs strictly falling (e.g. points of a logged search
    # path). Empty: keep the table's.
    configs: list[list[int]] = field(default_factory=list)
    # Give back channel steps after the search (or to the kept or given configurations): widen sub-network i
    # (i >= 1) one group step at a time, keeping the step that raises the search batch's PSNR most, while
    # its FLOPs stay within ``targets[i-1]`` of the widest's and its widths within sub-network i-1's. A cut
    # overshoots its target by up to one step's FLOPs; this spends what is left.
    refill: bool = False
    # The short fine-tune of the supernet restricted to the K tailored configurations (0 = none): every
    # step trains the widest on the clean image and the other K-1 with in-place distillation from it.
    finetune_steps: int = 0
    finetune_lr: float = 5e-5
    finetune_crop: int = 128
    finetune_batch: int = 8
    log_every: int = 10
    # The fine-tune is resumable (``ddsnet-train tailor --resume``): its state is saved every ``save_every`` steps,
    # and on stopping early after ``max_minutes`` (> 0) or at step ``stop_at`` (> 0).
    save_every: int = 100
    max_minutes: float = 0.0
    stop_at: int = 0
    seed: int = 0


@dataclass
class GateStage(RunOptions):
    """Stage 3: gate training on online labels (smallest sub-network within ``delta_db`` of the widest)."""

    tailored: str = "runs/tailor/tailored.safetensors"
    # Writes ddsnet.safetensors (the gated checkpoint), config.yaml, log.jsonl and report.json here.
    out_dir: str = "runs/gate"
    data: DataConfig = field(default_factory=DataConfig)
    # A number, or "auto": ship the sweep's gate with the fewest validation FLOPs among those whose
    # validation PSNR is within ``auto_max_drop_db`` of the widest's and, when set, whose validation FLOPs
    # are within ``auto_max_flops_fraction`` of the widest's (see ``training.gate.choose_shipped``).
    delta_db: float | str = 0.1
    auto_max_drop_db: float = 0.05
    auto_max_flops_fraction: float | None = None
    delta_sweep: list[float] = field(default_factory=lambda: [0.0, 0.05, 0.1, 0.2, 0.5])
    steps: int = 300
    batch_size: int = 16
    crop: int = 128
    lr: float = 2e-3
    cost_weight: float = 0.0
    gate: dict = field(default_factory=dict)
    log_every: int = 10
    save_dtype: str = "float32"
    seed: int = 0


@dataclass
class StaticStage(RunOptions, Schedule, SandwichLoss):
    """Static baselines: a network of each of a tailored checkpoint's K shapes, trained alone from scratch
    (no weight sharing, no distillation) on stage 1's schedule, to compare with the sub-networks."""

    tailored: str = "runs/tailor/tailored.safetensors"
    out_dir: str = "runs/static"
    data: DataConfig = field(default_factory=DataConfig)


def _convert(value: str) -> Any:
    try:
        return yaml.safe_load(value)
    except yaml.YAMLError:
        return value


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """Apply ``a.b=value`` strings to a nested dict; values are parsed as YAML scalars or lists."""
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"override {item!r} is not of the form key=value")
        node = raw
        *parents, leaf = key.split(".")
        for name in parents:
            node = node.setdefault(name, {})
            if not isinstance(node, dict):
                raise ValueError(f"override {item!r}: {name} is not a section")
        node[leaf] = _convert(value)
    return raw


def _build(cls: type[ConfigT], raw: dict, where: str = "") -> ConfigT:
    known = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - set(known))
    if unknown:
        raise ValueError(f"unknown config key(s) {', '.join(where + k for k in unknown)}")
    values = {}
    for name, value in raw.items():
        default = known[name].default_factory() if known[name].default_factory is not dataclasses.MISSING else None
        if dataclasses.is_dataclass(default) and isinstance(value, dict):
            value = _build(type(default), value, f"{where}{name}.")
        values[name] = value
    return cls(**values)


def load_config(cls: type[ConfigT], path: str | Path | None, overrides: list[str] | None = None) -> ConfigT:
    """Read ``path`` (YAML; ``None`` = defaults), apply overrides and build ``cls``."""
    raw = {}
    if path is not None:
        raw = yaml.safe_load(Path(path).read_text()) or {}
        if not isinstance(raw, dict):
            raise ValueError(f"{path}: the top level must be a mapping")
    return _build(cls, apply_overrides(raw, overrides or []))


def save_config(config: Any, path: str | Path) -> None:
    """Write the effective config as YAML next to a stage's outputs."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(yaml.safe_dump(json.loads(json.dumps(dataclasses.asdict(config))), sort_keys=False))


def resume_config(cls: type[ConfigT], base: str | Path, overrides: list[str]) -> tuple[ConfigT, Path]:
    """The config of a resumed run: the ``config.yaml`` its last start saved in ``out_dir`` (found through
    ``base`` and the overrides), with the overrides applied again on top.

    Resuming from the committed config instead would silently restart the cosine schedule, the crop
    schedule and the data settings under that file's values. Returns the config and the file it came
    from (``base`` itself where ``out_dir`` holds no saved config).
    """
    out_dir = Path(load_config(cls, base, overrides).out_dir)
    saved = out_dir / CONFIG_FILE
    source = saved if saved.is_file() else Path(base)
    return load_config(cls, source, overrides), source
