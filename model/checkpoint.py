"""The checkpoint: the one contract between training and serving.

A single safetensors file. Tensors are the supernet's (``net.*``) and the gate's (``gate.*``) weights.
The header's metadata holds one key, ``ddsnet``, a JSON document:

```
{"format": "ddsnet-checkpoint", "version": 1,
 "model": {SupernetConfig}, "gate": {"config": {GateConfig}, "trained": bool},
 "subnets": [{"widths": [...], "mflops_per_pixel": float, "val_psnr": {"15": dB, ...}}, ...],
 "provenance": {...}, "tensors_sha256": "..."}
```

Loading never unpickles. A missing, truncated, corrupted or mismatched file raises
:class:`CheckpointError` with a message that names the problem.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from model.gate import Gate, GateConfig
from model.supernet import SlimUNet, SupernetConfig, WidthConfig

# The shipped checkpoint, relative to the repository root: the default of every command that reads one.
DEFAULT_CHECKPOINT = "checkpoints/ddsnet-color.safetensors"
FORMAT = "ddsnet-checkpoint"
VERSION = 1
METADATA_KEY = "ddsnet"


class CheckpointError(Exception):
    """The file cannot be used as a ddsnet checkpoint; the message says why."""


@dataclass(frozen=True)
class Subnet:
    """One row of the sub-network table: a configuration (the channel count of every group, see
    :meth:`SlimUNet.groups`), its cost and its validation PSNR."""

    widths: WidthConfig
    mflops_per_pixel: float
    val_psnr: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"widths": list(self.widths), "mflops_per_pixel": self.mflops_per_pixel, "val_psnr": self.val_psnr}


@dataclass
class Checkpoint:
    net: SlimUNet
    gate: Gate
    subnets: list[Subnet]
    gate_trained: bool = False
    provenance: dict = field(default_factory=dict)


def _tensors_digest(tensors: dict[str, torch.Tensor]) -> str:
    digest = hashlib.sha256()
    for name in sorted(tensors):
        digest.update(name.encode())
        digest.update(tensors[name].detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def save_checkpoint(
    path: str | Path,
    net: SlimUNet,
    gate: Gate,
    subnets: list[Subnet],
    *,
    gate_trained: bool,
    provenance: dict | None = None,
    dtype: torch.dtype = torch.float32,
) -> None:
    """Write ``net``, ``gate`` and the sub-network table to ``path`` (atomically: temp file, then rename)."""
    if len(subnets) != gate.config.num_subnets:
        raise ValueError(f"{len(subnets)} sub-networks but the gate scores {gate.config.num_subnets}")
    for subnet in subnets:
        net.validate(subnet.widths)
    tensors = {f"net.{k}": v.detach().to("cpu", dtype).contiguous() for k, v in net.state_dict().items()}
    tensors |= {f"gate.{k}": v.detach().to("cpu", dtype).contiguous() for k, v in gate.state_dict().items()}
    document = {
        "format": FORMAT,
        "version": VERSION,
        "model": net.config.to_dict(),
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
    if document.get("format") != FORMAT:
        raise CheckpointError(f"{path}: metadata format is {document.get('format')!r}, expected {FORMAT!r}")
    if document.get("version") != VERSION:
        raise CheckpointError(f"{path}: checkpoint version {document.get('version')!r}, this ddsnet reads {VERSION}")
    return document


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu") -> Checkpoint:
    """Build the supernet and gate from the checkpoint's own config and load their weights (as float32)."""
    path = Path(path)
    document = read_metadata(path)
    try:
        net = SlimUNet(SupernetConfig.from_dict(document["model"]))
        gate = Gate(GateConfig.from_dict(document["gate"]["config"]))
        subnets = [
            # "channels": the key of this table in checkpoints written by ddsnet before 0.2.
            Subnet(net.validate(row["widths"] if "widths" in row else row["channels"]), float(row["mflops_per_pixel"]),
                   dict(row.get("val_psnr", {})))
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

    for prefix, module in (("net.", net), ("gate.", gate)):
        expected = module.state_dict()
        found = {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
        missing, unexpected = sorted(expected.keys() - found.keys()), sorted(found.keys() - expected.keys())
        if missing or unexpected:
            raise CheckpointError(
                f"{path}: weights do not match the config: missing {missing[:3]}, unexpected {unexpected[:3]}"
            )
        for name, tensor in found.items():
            if tensor.shape != expected[name].shape:
                raise CheckpointError(
                    f"{path}: tensor {prefix}{name} has shape {tuple(tensor.shape)}, "
                    f"the config needs {tuple(expected[name].shape)}"
                )
        module.load_state_dict({k: v.float() for k, v in found.items()})
    net.to(device).eval()
    gate.to(device).eval()
    return Checkpoint(net, gate, subnets, bool(document["gate"].get("trained", False)), document.get("provenance", {}))
