"""ddsnet's network: the slimmable supernet, the gate, FLOPs, tiling and checkpoint I/O. Pure PyTorch."""

from model.checkpoint import (
    DEFAULT_CHECKPOINT,
    Checkpoint,
    CheckpointError,
    Subnet,
    load_checkpoint,
    save_checkpoint,
)
from model.flops import gate_macs, supernet_macs, supernet_mflops_per_pixel
from model.gate import Gate, GateConfig
from model.inference import Denoiser, DenoiseResult, Noise, Quality, Selection, resolve_device
from model.supernet import SlimUNet, SupernetConfig, WidthConfig
from model.tiling import denoise_tiled, denoise_whole


def package_version() -> str:
    """The installed ddsnet's version, or ``"unknown"`` when it runs from a source tree without installing."""
    from importlib import metadata

    try:
        return metadata.version("ddsnet")
    except metadata.PackageNotFoundError:
        return "unknown"


__all__ = [
    "DEFAULT_CHECKPOINT",
    "Checkpoint",
    "CheckpointError",
    "DenoiseResult",
    "Denoiser",
    "Gate",
    "GateConfig",
    "Noise",
    "Quality",
    "Selection",
    "SlimUNet",
    "Subnet",
    "SupernetConfig",
    "WidthConfig",
    "denoise_tiled",
    "denoise_whole",
    "gate_macs",
    "load_checkpoint",
    "package_version",
    "resolve_device",
    "save_checkpoint",
    "supernet_macs",
    "supernet_mflops_per_pixel",
]
