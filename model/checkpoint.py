"""The checkpoint: the one contract between training and serving.

A single safetensors file. Tensors are the supernet's (``net.*``) and the gate's (``gate.*``) weights. A
checkpoint may hold several *profiles*: supernets of one architecture, each trained for other noise (``white``
for white noise, ``compressed`` for JPEG-compressed and correlated noise). The first profile's weights are
``net.*``, each other one's ``profile.<name>.*``. The header's metadata holds one key, ``ddsnet``, a JSON
document:

```
{"format": "ddsnet-checkpoint", "version": 2,
 "model": {SupernetConfig}, "profiles": ["white", "compressed"],
 "gate": {"config": {GateConfig}, "trained": bool},
 "subnets": [{"profile": "white", "widths": [...], "mflops_per_pixel": float, "val_psnr": {"15": dB, ...}}, ...],
 "provenance": {...}, "tensors_sha256": "..."}
```

A sub-network is a (profile, widths) pair, a row of ``subnets``; the gate scores every row. Version 1 files
(one profile, no ``profiles`` key) read as the profile ``white``. Weights may be stored in float16; they are
loaded as float32 and computed in float32.

Loading never unpickles. A missing, truncated, corrupted or mismatched file raises
:class:`CheckpointError` with a message that names the problem. The metadata is checked against a schema
with bounds (:func:`check_document`) before anything is built, the network is then built on the ``meta``
device and its tensor shapes compared with the file's, so that memory is only ever allocated for tensors the
file holds; weights that are not finite are refused.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from model.gate import Gate, GateConfig
from model.supernet import SlimUNet, SupernetConfig, WidthConfig

# The shipped checkpoint, relative to the repository root: the default of every command that reads one.
DEFAULT_CHECKPOINT = "checkpoints/ddsnet-color.safetensors"
FORMAT = "ddsnet-checkpoint"
VERSION = 2
READABLE_VERSIONS = (1, 2)
METADATA_KEY = "ddsnet"
# The profile of a single-profile checkpoint: the network trained on white noise.
DEFAULT_PROFILE = "white"
PROFILE_NAME = re.compile(r"[a-z][a-z0-9_-]{0,31}")
MAX_PROFILES = 8


class CheckpointError(Exception):
    """The file cannot be used as a ddsnet checkpoint; the message says why."""


# Bounds of the metadata schema, far above any real ddsnet. They keep the configs sane; what bounds memory is
# the comparison of the implied tensor shapes with the file's (``_check_shapes``), before anything is built.
MAX_CHANNELS = 2048
MAX_LEVELS = 6  # a size multiple of at most 32, so the 64-pixel warm-up and the smallest tiles fit
MAX_BLOCKS = 64
MAX_SUBNETS = 64
MAX_TABLE_ENTRIES = 64
MAX_PROVENANCE_BYTES = 1 << 20


def _integer(value, name: str, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise CheckpointError(f"{name} must be an integer in [{low}, {high}], not {value!r:.80}")
    return value


def _integers(value, name: str, low: int, high: int, min_len: int, max_len: int) -> list[int]:
    if not isinstance(value, list) or not min_len <= len(value) <= max_len:
        raise CheckpointError(f"{name} must be a list of {min_len} to {max_len} integers, not {value!r:.80}")
    return [_integer(item, f"{name}[{i}]", low, high) for i, item in enumerate(value)]


def _number(value, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise CheckpointError(f"{name} must be a finite number, not {value!r:.80}")
    return float(value)


def _mapping(value, name: str, allowed: set[str]) -> dict:
    if not isinstance(value, dict):
        raise CheckpointError(f"{name} must be a JSON object, not {type(value).__name__}")
    unknown = sorted(set(value) - allowed)
    if unknown:
        raise CheckpointError(f"{name} has unknown key(s) {', '.join(map(str, unknown))[:200]}")
    return value


def check_document(document) -> None:
    """Check a checkpoint's JSON document against the schema and its bounds; raise :class:`CheckpointError`."""
    document = _mapping(document, "metadata", {"format", "version", "model", "profiles", "gate", "subnets",
                                                "provenance", "tensors_sha256"})
    profiles = profile_names(document)
    model = _mapping(document.get("model"), "model", {f.name for f in fields(SupernetConfig)})
    levels = len(_integers(model.get("channels", [32, 64, 128, 256]), "model.channels", 1, MAX_CHANNELS, 2,
                           MAX_LEVELS))
    for key in ("enc_blocks", "dec_blocks"):
        if key in model:
            _integers(model[key], f"model.{key}", 0, MAX_BLOCKS, levels - 1, levels - 1)
    for key, low, high in (("in_channels", 3, 3), ("body_blocks", 0, MAX_BLOCKS), ("steps_per_width", 1, 64),
                           ("min_steps", 1, 64)):
        if key in model:
            _integer(model[key], f"model.{key}", low, high)
    gate = _mapping(document.get("gate"), "gate", {"config", "trained"})
    gate_config = _mapping(gate.get("config"), "gate.config", {f.name for f in fields(GateConfig)})
    for key, low, high in (("in_channels", 3, 3), ("num_subnets", 1, MAX_SUBNETS), ("hidden", 1, MAX_CHANNELS)):
        if key in gate_config:
            _integer(gate_config[key], f"gate.config.{key}", low, high)
    if "features" in gate_config:
        _integers(gate_config["features"], "gate.config.features", 1, MAX_CHANNELS, 3, 3)
    if not isinstance(gate_config.get("noise_stats", False), bool):
        raise CheckpointError("gate.config.noise_stats must be true or false")
    if gate_config.get("profiles"):
        _integers(gate_config["profiles"], "gate.config.profiles", 0, len(profiles) - 1,
                  gate_config.get("num_subnets", 4), gate_config.get("num_subnets", 4))
    if not isinstance(gate.get("trained", False), bool):
        raise CheckpointError("gate.trained must be true or false")
    subnets = document.get("subnets")
    if not isinstance(subnets, list) or not 1 <= len(subnets) <= MAX_SUBNETS:
        raise CheckpointError(f"subnets must be a list of 1 to {MAX_SUBNETS} rows")
    for index, row in enumerate(subnets):
        row = _mapping(row, f"subnets[{index}]", {"profile", "widths", "channels", "mflops_per_pixel", "val_psnr"})
        if row.get("profile", profiles[0]) not in profiles:
            raise CheckpointError(f"subnets[{index}].profile must be one of the profiles {profiles}")
        _integers(row.get("widths", row.get("channels")), f"subnets[{index}].widths", 1, MAX_CHANNELS, 1,
                  4 * MAX_BLOCKS + MAX_LEVELS)
        _number(row.get("mflops_per_pixel"), f"subnets[{index}].mflops_per_pixel")
        table = row.get("val_psnr", {})
        if not isinstance(table, dict) or len(table) > MAX_TABLE_ENTRIES:
            raise CheckpointError(f"subnets[{index}].val_psnr must be an object of at most {MAX_TABLE_ENTRIES} entries")
        for key, value in table.items():
            _number(value, f"subnets[{index}].val_psnr[{key!r:.40}]")
    if gate_config.get("profiles") and gate_config["profiles"] != [
            profiles.index(row.get("profile", profiles[0])) for row in subnets]:
        raise CheckpointError("gate.config.profiles must give the profile of each row of subnets, in order")
    provenance = document.get("provenance", {})
    if not isinstance(provenance, dict) or len(json.dumps(provenance)) > MAX_PROVENANCE_BYTES:
        raise CheckpointError(f"provenance must be a JSON object of at most {MAX_PROVENANCE_BYTES} bytes")


def profile_names(document: dict) -> list[str]:
    """The profiles a checkpoint's document lists, first the one whose weights are ``net.*``."""
    profiles = document.get("profiles", [DEFAULT_PROFILE])
    if not isinstance(profiles, list) or not 1 <= len(profiles) <= MAX_PROFILES or len(set(profiles)) != len(profiles):
        raise CheckpointError(f"profiles must be a list of 1 to {MAX_PROFILES} distinct names")
    for name in profiles:
        if not isinstance(name, str) or not PROFILE_NAME.fullmatch(name):
            raise CheckpointError(f"profile name {name!r:.40} must be lower-case letters, digits, '-' or '_'")
    return profiles


def _prefix(profiles: list[str], name: str) -> str:
    """Where a profile's tensors live: ``net.`` for the first, ``profile.<name>.`` for the others."""
    return "net." if name == profiles[0] else f"profile.{name}."


@dataclass(frozen=True)
class Subnet:
    """One row of the sub-network table: a profile (which supernet), a configuration (the channel count of
    every group, see :meth:`SlimUNet.groups`), its cost and its validation PSNR."""

    widths: WidthConfig
    mflops_per_pixel: float
    val_psnr: dict[str, float] = field(default_factory=dict)
    profile: str = DEFAULT_PROFILE

    def to_dict(self) -> dict:
        return {"profile": self.profile, "widths": list(self.widths), "mflops_per_pixel": self.mflops_per_pixel,
                "val_psnr": self.val_psnr}


@dataclass
class Checkpoint:
    """A loaded checkpoint. ``net`` is the first profile's supernet; ``nets`` holds every profile's, in order."""

    net: SlimUNet
    gate: Gate
    subnets: list[Subnet]
    gate_trained: bool = False
    provenance: dict = field(default_factory=dict)
    tensors_sha256: str = ""  # the digest of the file's tensors: which weights these are
    nets: dict[str, SlimUNet] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.nets:
            self.nets = {self.subnets[0].profile if self.subnets else DEFAULT_PROFILE: self.net}

    @property
    def profiles(self) -> list[str]:
        return list(self.nets)


def _tensors_digest(tensors: dict[str, torch.Tensor]) -> str:
    digest = hashlib.sha256()
    for name in sorted(tensors):
        digest.update(name.encode())
        digest.update(tensors[name].detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def save_checkpoint(
    path: str | Path,
    net: SlimUNet | Mapping[str, SlimUNet],
    gate: Gate,
    subnets: list[Subnet],
    *,
    gate_trained: bool,
    provenance: dict | None = None,
    dtype: torch.dtype = torch.float32,
) -> None:
    """Write the supernet(s), ``gate`` and the sub-network table to ``path`` (atomically: temp file, then rename).

    Args:
        net: one supernet (its profile is the one its sub-networks name), or profile name -> supernet, the
            first profile first; every profile has the same architecture.
        dtype: how the weights are stored (float32, or float16 at half the size).
    """
    nets = dict(net) if isinstance(net, Mapping) else {subnets[0].profile if subnets else DEFAULT_PROFILE: net}
    profiles = list(nets)
    if len(subnets) != gate.config.num_subnets:
        raise ValueError(f"{len(subnets)} sub-networks but the gate scores {gate.config.num_subnets}")
    first = nets[profiles[0]]
    if any(other.config != first.config for other in nets.values()):
        raise ValueError("every profile's supernet must have the same architecture")
    for subnet in subnets:
        if subnet.profile not in nets:
            raise ValueError(f"sub-network of profile {subnet.profile!r}, but the profiles are {profiles}")
        first.validate(subnet.widths)
    tensors = {}
    for name, supernet in nets.items():
        prefix = _prefix(profiles, name)
        tensors |= {prefix + k: v.detach().to("cpu", dtype).contiguous() for k, v in supernet.state_dict().items()}
    tensors |= {f"gate.{k}": v.detach().to("cpu", dtype).contiguous() for k, v in gate.state_dict().items()}
    document = {
        "format": FORMAT,
        "version": VERSION,
        "model": first.config.to_dict(),
        "profiles": profiles,
        "gate": {"config": gate.config.to_dict(), "trained": gate_trained},
        "subnets": [s.to_dict() for s in subnets],
        "provenance": provenance or {},
        "tensors_sha256": _tensors_digest(tensors),
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    save_file(tensors, str(partial), metadata={METADATA_KEY: json.dumps(document)})
    partial.chmod(0o644)  # safetensors writes 0600; a checkpoint is meant to be shared (e.g. into a container)
    partial.replace(path)


def read_metadata(path: str | Path) -> dict:
    """The checkpoint's JSON document, checked for format and version, without loading weights."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
    except (SafetensorError, OSError, ValueError) as error:
        raise CheckpointError(f"{path}: not a readable safetensors file (truncated or corrupted?): {error}") from None
    if METADATA_KEY not in metadata:
        raise CheckpointError(f"{path}: a safetensors file, but not a ddsnet checkpoint (no '{METADATA_KEY}' metadata)")
    try:
        document = json.loads(metadata[METADATA_KEY])
    except json.JSONDecodeError as error:
        raise CheckpointError(f"{path}: ddsnet metadata is not valid JSON: {error}") from None
    except RecursionError:
        raise CheckpointError(f"{path}: ddsnet metadata is nested too deeply") from None
    if not isinstance(document, dict):
        raise CheckpointError(f"{path}: ddsnet metadata must be a JSON object, not {type(document).__name__}")
    if document.get("format") != FORMAT:
        raise CheckpointError(f"{path}: metadata format is {document.get('format')!r}, expected {FORMAT!r}")
    if document.get("version") not in READABLE_VERSIONS:
        raise CheckpointError(f"{path}: checkpoint version {document.get('version')!r}, this ddsnet reads "
                              f"{', '.join(map(str, READABLE_VERSIONS))}")
    return document


def _check_shapes(path: Path, model_config: SupernetConfig, gate_config: GateConfig, profiles: list[str]) -> None:
    """Compare the shapes the configs imply (built on the ``meta`` device: no memory) with the file's."""
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in SlimUNet(model_config).state_dict().items()}
        expected = {_prefix(profiles, name) + k: shape for name in profiles for k, shape in shapes.items()}
        expected |= {f"gate.{k}": tuple(v.shape) for k, v in Gate(gate_config).state_dict().items()}
    try:
        with safe_open(str(path), framework="pt") as handle:
            found = {name: tuple(handle.get_slice(name).get_shape()) for name in handle.keys()}
    except (SafetensorError, OSError, ValueError) as error:
        raise CheckpointError(f"{path}: tensor index unreadable: {error}") from None
    missing, unexpected = sorted(expected.keys() - found.keys()), sorted(found.keys() - expected.keys())
    if missing or unexpected:
        raise CheckpointError(f"{path}: weights do not match the config: missing {missing[:3]}, "
                              f"unexpected {unexpected[:3]}")
    for name, shape in expected.items():
        if found[name] != shape:
            raise CheckpointError(f"{path}: tensor {name} has shape {found[name]}, the config needs {shape}")


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu") -> Checkpoint:
    """Build the supernet and gate from the checkpoint's own config and load their weights (as float32)."""
    path = Path(path)
    document = read_metadata(path)
    try:
        check_document(document)
    except CheckpointError as error:
        raise CheckpointError(f"{path}: {error}") from None
    try:
        model_config = SupernetConfig.from_dict(document["model"])
        gate_config = GateConfig.from_dict(document["gate"]["config"])
    except (KeyError, TypeError, ValueError) as error:
        raise CheckpointError(f"{path}: model config is invalid: {error}") from None
    profiles = profile_names(document)
    _check_shapes(path, model_config, gate_config, profiles)
    try:
        nets = {name: SlimUNet(model_config) for name in profiles}
        net = nets[profiles[0]]
        gate = Gate(gate_config)
        subnets = [
            # "channels": the key of this table in checkpoints written by ddsnet before 0.2.
            Subnet(net.validate(row["widths"] if "widths" in row else row["channels"]), float(row["mflops_per_pixel"]),
                   dict(row.get("val_psnr", {})), row.get("profile", profiles[0]))
            for row in document["subnets"]
        ]
    except (KeyError, TypeError, ValueError) as error:
        raise CheckpointError(f"{path}: model config or sub-network table is invalid: {error!r}") from None
    if len(subnets) != gate.config.num_subnets or not subnets:
        raise CheckpointError(f"{path}: {len(subnets)} sub-networks listed, the gate scores {gate.config.num_subnets}")

    try:
        with safe_open(str(path), framework="pt") as handle:
            tensors = {name: handle.get_tensor(name) for name in handle.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as error:
        raise CheckpointError(f"{path}: tensor data unreadable (truncated or corrupted?): {error}") from None
    if _tensors_digest(tensors) != document.get("tensors_sha256"):
        raise CheckpointError(f"{path}: tensor data does not match its recorded SHA-256 (corrupted file)")
    for name, tensor in tensors.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise CheckpointError(f"{path}: tensor {name} holds NaN or infinite values")

    modules = [(_prefix(profiles, name), module) for name, module in nets.items()] + [("gate.", gate)]
    for prefix, module in modules:  # names and shapes were checked by _check_shapes
        module.load_state_dict({k[len(prefix) :]: v.float() for k, v in tensors.items() if k.startswith(prefix)})
        module.to(device).eval()
    return Checkpoint(net, gate, subnets, bool(document["gate"].get("trained", False)), document.get("provenance", {}),
                      document["tensors_sha256"], nets)
