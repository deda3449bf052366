"""``ddsnet-train pipeline``: every stage in one command, from a profile, into one folder.

A profile (``training/recipes/gpu.yaml``, ``smoke.yaml``) is YAML with one section of ``--set``-style
overrides per stage (``supernet``, ``tailor``, ``profile``, ``gate``, ``static``), applied on top of the
committed stage configs, and ``photo_side``: when > 0, the photos are first copied downscaled to that long
side (the smoke profile's small, fast photos). The stages write into ``OUT/supernet``, ``OUT/tailor``,
``OUT/profile`` and ``OUT/gate``. With a ``profile`` section, a second set of weights (the ``compressed``
noise profile, ``training.config.ProfileStage``) is fine-tuned from the tailored checkpoint, and the gate
chooses among both profiles' sub-networks. The gated checkpoint is ``OUT/gate/ddsnet.safetensors``, and
``OUT/summary.json`` records each stage's wall-clock time and the validation tables. With ``--static``, the
static baselines of the tailored shapes are trained instead (into ``OUT/static``), on stage 1's budget each,
from an earlier run's ``OUT/tailor``.

A stage-2 fine-tune that its ``max_minutes`` stops early is closed where it stopped: its table and
checkpoint are written from the weights it reached, so a time budget never leaves a run without a
checkpoint.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import yaml
from PIL import Image, ImageOps

from training.common import read_state_meta
from training.config import CONFIG_DIR, GateStage, ProfileStage, StaticStage, SupernetStage, TailorStage, load_config
from training.data import list_images

RECIPE_DIR = Path(__file__).resolve().parent / "recipes"
PROFILES = ("gpu", "smoke")
STAGE_SECTIONS = ("supernet", "tailor", "profile", "gate", "static")
SECTIONS = (*STAGE_SECTIONS, "photo_side")


def read_profile(name_or_path: str) -> dict:
    """A profile by name (``gpu``, ``smoke``) or path; refuses unknown sections."""
    path = RECIPE_DIR / f"{name_or_path}.yaml" if name_or_path in PROFILES else Path(name_or_path)
    if not path.is_file():
        raise FileNotFoundError(f"profile not found: {name_or_path} (the named ones are {', '.join(PROFILES)})")
    profile = yaml.safe_load(path.read_text()) or {}
    if not isinstance(profile, dict):
        raise ValueError(f"{path}: a profile is a mapping of sections")
    unknown = sorted(set(profile) - set(SECTIONS))
    if unknown:
        raise ValueError(f"{path}: unknown section(s) {', '.join(unknown)}; the sections are {', '.join(SECTIONS)}")
    return profile | {"name": path.stem}


def overrides(section: dict | None, prefix: str = "") -> list[str]:
    """A profile section as ``a.b=value`` overrides: mappings are walked down to their leaves, so that a
    section changes only the keys it names; other values are written as YAML (lists survive)."""
    items = []
    for key, value in (section or {}).items():
        if isinstance(value, dict):
            items += overrides(value, f"{prefix}{key}.")
        else:
            text = yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip()
            items.append(f"{prefix}{key}={text}")
    return items


def downscaled_copy(source: Path, target: Path, side: int) -> Path:
    """Copies of the images in ``source`` with their long side ``side`` (never enlarged), as PNG."""
    target.mkdir(parents=True, exist_ok=True)
    for path in list_images(source):
        with Image.open(path) as image:
            image = ImageOps.exif_transpose(image).convert("RGB")
            image.thumbnail((side, side), Image.Resampling.LANCZOS)
            image.save(target / f"{path.stem}.png")
    return target


def photo_dirs(photos: Path, out_dir: Path, side: int) -> tuple[Path, Path]:
    """The training and validation folders under ``photos``, downscaled into ``out_dir`` when ``side`` > 0."""
    train, val = photos / "train", photos / "val"
    for folder in (train, val):
        list_images(folder)  # a clear error before any work when a folder is missing or empty
    if side > 0:
        train = downscaled_copy(train, out_dir / "photos" / "train", side)
        val = downscaled_copy(val, out_dir / "photos" / "val", side)
    return train, val


def run_closed(stage_config: TailorStage) -> Path:
    """Stage 2 (or a profile) run to its checkpoint: a fine-tune that its ``max_minutes`` stops early is closed
    where it stopped, its table and checkpoint written from the weights it reached."""
    from training.tailor import FINETUNE_STATE_FILE, tailor

    written = tailor(stage_config)
    if written.name == FINETUNE_STATE_FILE:
        reached = int(read_state_meta(written)["step"])
        stage_config.finetune_steps, stage_config.max_minutes = reached, 0.0
        written = tailor(stage_config, resume=True)
    return written


def run_pipeline(profile_name: str, photos: str | Path, out_dir: str | Path, extra: list[str] | None = None,
                 static: bool = False) -> Path:
    """Run the three stages (or, with ``static``, the static baselines) of a profile.

    Args:
        profile_name: ``gpu``, ``smoke`` or a profile file.
        photos: a folder with ``train/`` and ``val/``.
        out_dir: where every stage writes.
        extra: ``STAGE.key=value`` overrides on top of the profile, e.g. ``supernet.steps=100``.
        static: train the static baselines of ``out_dir/tailor``'s shapes instead.

    Returns:
        The gated checkpoint, or with ``static`` the static baselines' ``table.json``.
    """
    from training.gate import REPORT_FILE, train_gate
    from training.static import train_static
    from training.supernet import train_supernet
    from training.tailor import TAILORED_FILE

    profile = read_profile(profile_name)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    train_dir, val_dir = photo_dirs(Path(photos), out, int(profile.get("photo_side", 0)))
    extra_by_stage: dict[str, list[str]] = {}
    for item in extra or []:
        stage, _, rest = item.partition(".")
        if stage not in STAGE_SECTIONS or not rest:
            raise ValueError(f"override {item!r} must start with one of {', '.join(s + '.' for s in STAGE_SECTIONS)}")
        extra_by_stage.setdefault(stage, []).append(rest)

    def config(cls, stage: str, *sets: str):
        common = [f"data.train_dir={train_dir}", f"data.val_dir={val_dir}", f"recipe={profile['name']}",
                  f"out_dir={out / stage}"]
        return load_config(cls, CONFIG_DIR / f"{stage}.yaml",
                           [*common, *sets, *overrides(profile.get(stage)), *extra_by_stage.get(stage, [])])

    summary_path = out / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.is_file() else {"profile": profile["name"]}
    seconds = summary.setdefault("seconds", {})

    def save_summary() -> None:
        summary_path.write_text(json.dumps(summary, indent=2))

    def timed(stage: str, run):
        started = time.time()
        result = run()
        seconds[stage] = round(time.time() - started, 1)
        save_summary()
        return result

    if static:
        static_config = config(StaticStage, "static", f"tailored={out / 'tailor' / TAILORED_FILE}")
        table = timed("static", lambda: train_static(static_config))
        summary["static"] = json.loads(table.read_text())
        save_summary()
        return table

    supernet = timed("supernet", lambda: train_supernet(config(SupernetStage, "supernet")))
    tailored = timed("tailor", lambda: run_closed(config(TailorStage, "tailor", f"supernet={supernet}")))
    profiles = []
    if "profile" in profile:
        profile_config = config(ProfileStage, "profile", f"supernet={tailored}")
        written = timed("profile", lambda: run_closed(profile_config))
        profiles = [f"profiles.{profile_config.profile}={written}"]
    gated = timed("gate", lambda: train_gate(config(GateStage, "gate", f"tailored={tailored}", *profiles)))
    summary["table"] = json.loads((out / "tailor" / "table.json").read_text())
    summary["gate"] = json.loads((out / "gate" / REPORT_FILE).read_text())["shipped"]
    summary["checkpoint"] = str(gated)
    save_summary()
    return gated
