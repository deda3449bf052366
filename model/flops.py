"""Analytic cost of the supernet and the gate.

We count multiply-accumulates (MACs) of convolutions and linear layers: the layers that dominate and the
ones ``torch.utils.flop_counter`` counts. Bias adds, ReLUs, residual adds and padding are not counted.
User-facing figures are FLOPs = 2 x MACs.
"""

from __future__ import annotations

from model.gate import NUM_STATS, GateConfig
from model.supernet import LayerSpec, SlimUNet, WidthConfig

# model.gate.noise_statistics per pixel: luma (3), its residual (10), the residual's energy and four lagged
# products (5), two steps (2), the three channels' residuals (30), the colour energy (6), the half-resolution mean
# and residual (4), the red-green products (3). Counted as MACs although most are adds.
STATS_MACS_PER_PIXEL = 63


def _conv_macs(spec: LayerSpec, height: int, width: int) -> int:
    in_h, in_w = height // spec.scale, width // spec.scale
    if spec.kind == "convT":
        positions = in_h * in_w
    else:
        positions = (in_h // spec.stride) * (in_w // spec.stride)
    return spec.kernel * spec.kernel * spec.in_channels * spec.out_channels * positions


def supernet_macs(net: SlimUNet, widths: WidthConfig, height: int, width: int) -> int:
    """MACs of one forward pass at ``widths`` on a ``(1, C, height, width)`` input.

    ``height`` and ``width`` must already be multiples of ``net.config.size_multiple``.
    """
    multiple = net.config.size_multiple
    if height % multiple or width % multiple:
        raise ValueError(f"size {height}x{width} is not a multiple of {multiple}; pad it first")
    return sum(_conv_macs(spec, height, width) for spec in net.layer_specs(widths))


def supernet_mflops_per_pixel(net: SlimUNet, widths: WidthConfig) -> float:
    """FLOPs per image pixel, in millions; independent of size once the size is a multiple."""
    side = net.config.size_multiple * 16
    return 2 * supernet_macs(net, widths, side, side) / (side * side) / 1e6


def gate_macs(config: GateConfig, height: int, width: int, widths: bool = True) -> int:
    """MACs of the gate on one ``height x width`` image (padded as the gate pads it). ``widths=False``: of the
    profile head alone (:meth:`model.gate.Gate.profile_log_probs`), which needs ``config.profiles``."""
    multiple = GateConfig.size_multiple
    height, width = height + (-height % multiple), width + (-width % multiple)
    if not widths:
        if not config.profiles:
            raise ValueError("this gate has no profile head")
        return STATS_MACS_PER_PIXEL * height * width + NUM_STATS * config.hidden + config.hidden * config.num_profiles
    f1, f2, f3 = config.features
    macs = 16 * config.in_channels * f1 * (height // 4) * (width // 4)
    macs += 9 * f1 * f2 * (height // 8) * (width // 8)
    macs += 9 * f2 * f3 * (height // 16) * (width // 16)
    if config.reads_stats:
        macs += STATS_MACS_PER_PIXEL * height * width
    fc_inputs = 2 * f3 + (NUM_STATS if config.noise_stats else 0)
    macs += fc_inputs * config.hidden + config.hidden * config.num_subnets
    if config.profiles:
        macs += NUM_STATS * config.hidden + config.hidden * config.num_profiles
    return macs
