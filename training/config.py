"""Stage configs: a dataclass per concern, read from YAML, with ``--set a.b=value`` overrides."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import yaml

from model.checkpoint import DEFAULT_CHECKPOINT
from model.supernet import SupernetConfig
from training.compute import ComputeConfig
from training.degradations import EVAL_SIGMAS, DegradationConfig

ConfigT = TypeVar("ConfigT")
CONFIG_FILE = "config.yaml"  # the effective config, saved in a stage's out_dir
# The stage config files: templates for a run's own settings. Every default is in the dataclasses below.
CONFIG_DIR = Path(__file__).resolve().parent / "configs"

# The ship rule of ``delta_db: auto`` (stage 3), which is also the `auto` target of the benchmarks: `auto` at
# most this far below the widest's PSNR on validation, in dB, at no more than this fraction of its FLOPs.
AUTO_MAX_DROP_DB = 0.05
AUTO_MAX_FLOPS_FRACTION = 0.6


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
    val_sigmas: list[float] = field(default_factory=lambda: list(EVAL_SIGMAS))
    # Validation inputs beyond AWGN at ``val_sigmas``: names of ``training.degradations.EVAL_DEGRADATIONS``.
    val_degradations: list[str] = field(default_factory=list)
    val_crop: int = 256
    val_seed: int = 1234
    # Validation views per photo: 1.0 the photo itself, 0.5 downscaled to half its sides (photo-like texture).
    val_scales: list[float] = field(default_factory=lambda: [1.0])
    # Training crops: random scale in this range (0.5: a region twice the crop's side, downsampled), and the
    # most textured of this many candidates.
    scale_range: list[float] = field(default_factory=lambda: [0.5, 1.0])
    texture_candidates: int = 2
    # The fraction of training crops that are synthetic dead-leaves images (``training.deadleaves``); 0 keeps the
    # crops of runs made before the option existed. 0.25 validates better on val-texture/ than 0 (docs/MODEL_CARD.md).
    dead_leaves: float = 0.0


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

    steps: int = 2400
    # [fraction of training at which it starts, crop side, batch size]
    crop_schedule: list[list[float]] = field(default_factory=lambda: [[0.0, 96, 12], [0.5, 128, 8]])
    lr: float = 5e-4
    lr_min: float = 1e-6
    warmup_steps: int = 50
    ema_decay: float = 0.995
    log_every: int = 10
    seed: int = 0


@dataclass
class SupernetStage(RunOptions, Schedule, SandwichLoss):
    """Stage 1: sandwich-rule training with in-place distillation."""

    out_dir: str = "runs/supernet"
    # The network's shape: the keys of ``model.supernet.SupernetConfig``.
    model: dict = field(default_factory=lambda: json.loads(json.dumps(SupernetConfig().to_dict())))
    data: DataConfig = field(default_factory=DataConfig)
    random_widths: int = 2
    val_every: int = 200
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
    search_sigmas: list[float] = field(default_factory=lambda: list(EVAL_SIGMAS))
    # FLOPs fractions of the widest at which a sub-network is recorded (the widest itself is always first).
    # K = 5: the widest, then ~70%, ~60%, ~45% and ~25% of its FLOPs. 0.598: the widest sub-network under
    # auto's FLOPs budget (``AUTO_MAX_FLOPS_FRACTION``). Tile margins and padding scale every sub-network's
    # FLOPs alike, so only the gate's cost adds to the fraction.
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
    finetune_steps: int = 300
    finetune_lr: float = 5e-5
    finetune_crop: int = 128
    finetune_batch: int = 8
    # > 0: the table is measured on centre crops of this side of every validation view instead of whole
    # photos, which costs a fraction of the time on large photos (each view is cropped after scaling).
    val_crop: int = 0
    log_every: int = 10
    # The fine-tune is resumable (``ddsnet-train tailor --resume``): its state is saved every ``save_every`` steps,
    # and on stopping early after ``max_minutes`` (> 0) or at step ``stop_at`` (> 0).
    save_every: int = 100
    max_minutes: float = 0.0
    stop_at: int = 0
    seed: int = 0


# The validation noises of the compressed profile: JPEG at low, middle and high quality, twice on a shifted
# grid, and downscaled noise (names of ``training.degradations.EVAL_DEGRADATIONS``).
COMPRESSED_VAL_DEGRADATIONS = ["jpeg80-awgn15", "jpeg30-awgn10", "jpeg60-awgn10", "jpeg95-awgn10",
                               "jpeg90x75-awgn10", "poisson40-jpeg80", "down0.7-awgn30"]


def compressed_data() -> DataConfig:
    """The data of the ``compressed`` profile: noise then JPEG at quality 30-95 (a third of them twice, on a
    shifted grid), sensor noise then JPEG, downscaled noise, and some white noise, so that a white input sent
    to this profile is still denoised. Its table is measured on the validation photos at full and half size:
    at half size alone a profile can look better than the white one on high-quality JPEG while it is worse on
    the photos at the size they are served."""
    mix = {"jpeg": 0.5, "poisson_jpeg": 0.15, "downscale": 0.2, "awgn": 0.15}
    return DataConfig(degradations=DegradationConfig(mix=mix, jpeg_sigma=[0.0, 30.0], jpeg_quality=[30, 95],
                                                     jpeg_double=0.3),
                      val_sigmas=[25.0], val_degradations=list(COMPRESSED_VAL_DEGRADATIONS), val_scales=[1.0, 0.5])


@dataclass
class ProfileStage(TailorStage):
    """A second set of weights for other noise: stage 2's fine-tune of a tailored checkpoint's supernet, on its
    own sub-networks (``search: false``), under another degradation mix. Stage 3 then gates between the
    profiles (``GateStage.profiles``)."""

    # The name the profile's rows carry in the sub-network table.
    profile: str = "compressed"
    # Starts from the shipped checkpoint's weights and keeps its sub-networks.
    supernet: str = DEFAULT_CHECKPOINT
    # The profile of ``supernet`` whose weights the run starts from and whose sub-networks it keeps, for a
    # checkpoint with several (a profile is re-made from its own weights); empty: its first profile.
    source_profile: str = ""
    out_dir: str = "runs/profile"
    search: bool = False
    data: DataConfig = field(default_factory=compressed_data)
    finetune_steps: int = 500
    finetune_lr: float = 2e-4
    finetune_crop: int = 96
    finetune_batch: int = 8
    save_every: int = 50


@dataclass
class GateStage(RunOptions):
    """Stage 3: gate training on online labels (smallest sub-network within ``delta_db`` of the widest)."""

    tailored: str = "runs/tailor/tailored.safetensors"
    # Writes ddsnet.safetensors (the gated checkpoint), config.yaml, log.jsonl and report.json here.
    out_dir: str = "runs/gate"
    # Uniform crops; each validation photo also at half size, where a 1024-pixel wallpaper has the texture
    # density of a 512-pixel photo and the narrow sub-networks lose more. ``delta_db: auto`` is judged on
    # both views together.
    data: DataConfig = field(default_factory=lambda: DataConfig(scale_range=[1.0, 1.0], texture_candidates=1,
                                                                val_scales=[1.0, 0.5]))
    # A number, or "auto": ship the sweep's gate with the fewest validation FLOPs among those whose
    # validation PSNR is within ``auto_max_drop_db`` of the widest's and, when set, whose validation FLOPs
    # are within ``auto_max_flops_fraction`` of the widest's (see ``training.gate.choose_shipped``); where
    # no gate within the FLOPs budget meets the drop, the one of those with the highest PSNR. Without the
    # budget, a gate whose labels are mostly "widest" would ship and `auto` would save nothing.
    delta_db: float | str = "auto"
    auto_max_drop_db: float = AUTO_MAX_DROP_DB
    auto_max_flops_fraction: float | None = AUTO_MAX_FLOPS_FRACTION
    delta_sweep: list[float] = field(default_factory=lambda: [0.0, 0.05, 0.1, 0.15, 0.2, 0.3, 0.5])
    steps: int = 300
    # 192x192 crops: PSNR gaps between sub-networks on small crops are noisy and bias the labels towards the
    # widest.
    batch_size: int = 8
    crop: int = 192
    lr: float = 2e-3
    cost_weight: float = 0.0
    # The weight of the expected PSNR given up (dB) in the loss: a wrong choice counts by what it costs.
    regret_weight: float = 0.0
    # Each step also trains the gates again on this many labelled batches of earlier steps (kept, the last
    # 64): the labels cost K sub-networks a batch, a gate update almost nothing.
    replay: int = 0
    # The keys of ``model.gate.GateConfig`` (its ``num_subnets`` is the table's length).
    gate: dict = field(default_factory=dict)
    # More profiles to gate between: name -> a profile stage's checkpoint (``ddsnet-train profile``), whose
    # sub-networks join ``tailored``'s, relabelled with the name. A name that ``tailored`` already holds (its
    # first included) is replaced in place: the profile is re-made.
    profiles: dict[str, str] = field(default_factory=dict)
    # > 0: validate on centre crops of this side instead of whole photos.
    val_crop: int = 0
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


def _build(cls: type[ConfigT], raw: dict, where: str = "", base: Any = None) -> ConfigT:
    """``cls`` from ``raw``, every key not in ``raw`` at its default. A nested section overrides only the
    keys it names, on top of the field's own default (a stage's ``data`` defaults are the stage's)."""
    known = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - set(known))
    if unknown:
        raise ValueError(f"unknown config key(s) {', '.join(where + k for k in unknown)}")
    values = {}
    for name, value in raw.items():
        if base is not None:
            default = getattr(base, name)
        elif known[name].default_factory is not dataclasses.MISSING:
            default = known[name].default_factory()
        else:
            default = None
        if dataclasses.is_dataclass(default) and isinstance(value, dict):
            value = _build(type(default), value, f"{where}{name}.", default)
        values[name] = value
    return dataclasses.replace(base, **values) if base is not None else cls(**values)


def load_config(cls: type[ConfigT], path: str | Path | None, overrides: list[str] | None = None) -> ConfigT:
    """Read ``path`` (YAML; ``None`` = defaults), apply overrides and build ``cls``."""
    raw = {}
    if path is not None:
        raw = yaml.safe_load(Path(path).read_text()) or {}
        if not isinstance(raw, dict):
            raise ValueError(f"{path}: the top level must be a mapping")
    return _build(cls, apply_overrides(raw, overrides or []))


def config_yaml(config: Any) -> str:
    """A config as YAML, every key in field order; :func:`load_config` reads it back to an equal config."""
    return yaml.safe_dump(json.loads(json.dumps(dataclasses.asdict(config))), sort_keys=False)


def save_config(config: Any, path: str | Path) -> None:
    """Write the effective config as YAML next to a stage's outputs."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(config_yaml(config))


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
