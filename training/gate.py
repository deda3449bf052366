"""Stage 3: train the gate on labels found online, then write the final (gated) checkpoint.

For each training crop, all K sub-networks run (the supernet is frozen); the label is the smallest
sub-network whose PSNR is within ``delta`` dB of the widest. One gate is trained per delta of the sweep
from the same online PSNRs (the gate is tiny, the PSNRs are the cost), so the sweep's PSNR-FLOPs curve
comes almost for free. The gate at ``delta_db`` is shipped, or with ``delta_db: auto`` the cheapest gate
on validation that stays within ``auto_max_drop_db`` of the widest there; with ``auto_max_flops_fraction``
set, auto also keeps to that fraction of the widest's FLOPs, and where no gate within the budget meets the
drop, the budget's best PSNR ships.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from model.checkpoint import load_checkpoint, save_checkpoint
from model.flops import gate_macs
from model.gate import Gate, GateConfig
from model.metrics import psnr
from model.tiling import denoise_whole
from training.common import JsonLog
from training.compute import Compute, next_batch, worker_batches
from training.config import CONFIG_FILE, GateStage, save_config
from training.data import PatchSampler, fixed_noisy_set, pair_label, pair_scale
from training.provenance import data_digests, provenance, stage_record

GATED_FILE = "ddsnet.safetensors"
REPORT_FILE = "report.json"


def smallest_within(psnrs: torch.Tensor, mflops: torch.Tensor, delta: float) -> torch.Tensor:
    """The label rule: per row, the cheapest sub-network whose PSNR >= the widest's PSNR - ``delta``.

    Args:
        psnrs: ``(B, K)`` PSNR of every sub-network on every sample.
        mflops: ``(K,)`` cost of each sub-network; the most expensive one is "the widest".
        delta: tolerance in dB.

    Returns:
        ``(B,)`` int64 labels (indices into the K sub-networks).
    """
    widest = int(mflops.argmax())
    good = psnrs >= psnrs[:, widest : widest + 1] - delta
    cost = torch.where(good, mflops.expand_as(psnrs), torch.full_like(psnrs, float("inf")))
    return cost.argmin(dim=1)


@torch.inference_mode()
def subnet_psnrs(net, subnets, noisy: torch.Tensor, clean: torch.Tensor) -> torch.Tensor:
    """``(B, K)`` PSNR of each sub-network on a batch."""
    return torch.stack([psnr(net(noisy, s.widths), clean) for s in subnets], dim=1)


def _validation_table(net, subnets, pairs) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Per validation pair: PSNR of every sub-network ``(N, K)`` and the noisy inputs."""
    rows = []
    device = next(net.parameters()).device
    for _, _, clean, noisy in tqdm(pairs, desc="gate (validation PSNRs)"):
        clean, on_device = clean.to(device), noisy.to(device)
        rows.append(torch.stack([psnr(denoise_whole(net, on_device, s.widths), clean)[0] for s in subnets]).cpu())
    return torch.stack(rows), [noisy for _, _, _, noisy in pairs]


def _report(gate: Gate, table: torch.Tensor, noisies: list, mflops: torch.Tensor, delta: float, sigmas,
            scales) -> dict:
    """Accuracy, confusion matrix, and auto/best/fast PSNR and FLOPs on the validation pairs, overall, per
    noise (``sigmas``: labels such as ``"25"`` or ``"jpeg80-awgn15"``) and per view scale (labels)."""
    gate.eval()
    device = next(gate.parameters()).device
    with torch.inference_mode():
        picks = torch.tensor([int(gate(noisy.to(device)).argmax()) for noisy in noisies])
    labels = smallest_within(table, mflops, delta)
    k = len(mflops)
    confusion = torch.zeros(k, k, dtype=torch.int64)
    for label, pick in zip(labels.tolist(), picks.tolist()):
        confusion[label, pick] += 1
    rows = torch.arange(len(picks))
    gate_mflops = [2 * gate_macs(gate.config, *n.shape[-2:]) / n.shape[-1] / n.shape[-2] / 1e6 for n in noisies]
    best, fast = int(mflops.argmax()), int(mflops.argmin())
    auto_psnr = table[rows, picks]

    def breakdown(keys: list[str]) -> dict:
        groups = {}
        for key in dict.fromkeys(keys):  # in order of first appearance
            mask = torch.tensor([x == key for x in keys])
            groups[key] = {
                "auto_psnr": round(auto_psnr[mask].mean().item(), 4),
                "best_psnr": round(table[mask, best].mean().item(), 4),
                "fast_psnr": round(table[mask, fast].mean().item(), 4),
                "auto_mflops_per_pixel": round(mflops[picks[mask]].mean().item()
                                               + sum(gate_mflops) / len(gate_mflops), 6),
            }
        return groups

    return {
        "delta_db": delta,
        "accuracy": round((picks == labels).float().mean().item(), 4),
        "confusion_matrix_label_by_pick": confusion.tolist(),
        "auto_psnr": round(auto_psnr.mean().item(), 4),
        "auto_mflops_per_pixel": round(mflops[picks].mean().item() + sum(gate_mflops) / len(gate_mflops), 6),
        "oracle_psnr": round(table[rows, labels].mean().item(), 4),
        "oracle_mflops_per_pixel": round(mflops[labels].mean().item(), 6),
        "best_psnr": round(table[:, best].mean().item(), 4),
        "best_mflops_per_pixel": round(mflops[best].item(), 6),
        "fast_psnr": round(table[:, fast].mean().item(), 4),
        "fast_mflops_per_pixel": round(mflops[fast].item(), 6),
        "by_sigma": breakdown(list(sigmas)),
        "by_scale": breakdown(list(scales)),
    }


def choose_shipped(sweep: list[dict], delta_db: float | str, max_drop_db: float,
                   max_flops_fraction: float | None = None) -> dict:
    """The sweep report whose gate ships: the one at ``delta_db``, or for ``"auto"``:

    - the fewest validation FLOPs among gates whose validation PSNR is at most ``max_drop_db`` below the
      widest's and, with ``max_flops_fraction``, whose validation FLOPs are at most that fraction of the
      widest's;
    - where none is both, the highest PSNR within the FLOPs budget (the budget is kept before the drop);
    - where no gate is within the budget, the same rule without one: the fewest FLOPs within the drop,
      else the highest PSNR.
    """
    if delta_db != "auto":
        return next(r for r in sweep if r["delta_db"] == delta_db)
    affordable = sweep
    if max_flops_fraction is not None:
        affordable = [r for r in sweep
                      if r["auto_mflops_per_pixel"] <= max_flops_fraction * r["best_mflops_per_pixel"]] or sweep
    within = [r for r in affordable if r["auto_psnr"] >= r["best_psnr"] - max_drop_db]
    if not within:
        return max(affordable, key=lambda r: (r["auto_psnr"], -r["auto_mflops_per_pixel"]))
    return min(within, key=lambda r: (r["auto_mflops_per_pixel"], -r["auto_psnr"]))


def train_gate(config: GateStage) -> Path:
    """Run stage 3 on the tailored checkpoint.

    Writes, in ``out_dir``: ``ddsnet.safetensors`` (the gated checkpoint), ``config.yaml`` (the effective
    config), ``log.jsonl`` and ``report.json`` (every gate of the sweep on validation, and the one shipped).
    """
    if config.delta_db != "auto" and not isinstance(config.delta_db, int | float):
        raise ValueError(f"delta_db must be a number of dB or 'auto', not {config.delta_db!r}")
    if config.delta_db == "auto" and not config.delta_sweep:
        raise ValueError("delta_db: auto chooses among the delta_sweep gates, and delta_sweep is empty")
    fraction = config.auto_max_flops_fraction
    if fraction is not None and not (isinstance(fraction, int | float) and 0 < fraction <= 1):
        raise ValueError(f"auto_max_flops_fraction must be in (0, 1] of the widest's FLOPs, or null, not {fraction!r}")
    out_dir = Path(config.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_config(config, out_dir / CONFIG_FILE)
    checkpoint = load_checkpoint(config.tailored)
    data_sha256 = data_digests(config.data)
    compute = Compute(config.compute)
    net, subnets = compute.module(checkpoint.net), checkpoint.subnets
    net.requires_grad_(False)
    mflops = torch.tensor([s.mflops_per_pixel for s in subnets])
    cost = mflops.to(compute.device)  # the labels' costs, next to the PSNRs they are chosen from
    relative_cost = cost / cost.max()
    torch.manual_seed(config.seed)
    deltas = sorted(set(config.delta_sweep) | ({config.delta_db} if config.delta_db != "auto" else set()))
    gate_config = GateConfig.from_dict({**config.gate, "num_subnets": len(subnets)})
    gates = {delta: compute.module(Gate(gate_config)) for delta in deltas}
    optimizers = {delta: torch.optim.Adam(g.parameters(), lr=config.lr) for delta, g in gates.items()}
    sampler = PatchSampler(config.data.train_dir, seed=config.seed, scale_range=config.data.scale_range,
                           texture_candidates=config.data.texture_candidates)
    generator = torch.Generator().manual_seed(config.seed)
    log = JsonLog(out_dir / "log.jsonl")
    started = time.time()
    batches = None
    if config.compute.workers:
        batches = worker_batches(config.data, config.seed, 1, config.steps + 1,
                                 lambda _: (config.crop, config.batch_size), config.compute.workers,
                                 pin_memory=compute.device.type == "cuda")

    for step in tqdm(range(1, config.steps + 1), desc="gate", dynamic_ncols=True):
        lr = config.lr * 0.5 * (1 + math.cos(math.pi * (step - 1) / config.steps))
        clean, noisy = next_batch(batches, sampler, config.data, generator, config.batch_size, config.crop, compute)
        psnrs = subnet_psnrs(net, subnets, noisy, clean)
        record = {"step": step, "lr": round(lr, 6)}
        for delta, gate in gates.items():
            labels = smallest_within(psnrs, cost, delta)
            logits = gate(noisy)
            loss = F.cross_entropy(logits, labels)
            if config.cost_weight:
                loss = loss + config.cost_weight * (logits.softmax(dim=1) @ relative_cost).mean()
            for group in optimizers[delta].param_groups:
                group["lr"] = lr
            optimizers[delta].zero_grad(set_to_none=True)
            loss.backward()
            optimizers[delta].step()
            record[f"delta_{delta:g}"] = {
                "loss": round(loss.item(), 5),
                "accuracy": round((logits.argmax(dim=1) == labels).float().mean().item(), 4),
                "label_histogram": torch.bincount(labels, minlength=len(subnets)).tolist(),
            }
        if step % config.log_every == 0 or step == config.steps:
            log.write(**record, seconds=round(time.time() - started, 1))

    pairs = fixed_noisy_set(config.data.val_dir, config.data.val_sigmas, config.data.val_seed,
                            scales=config.data.val_scales, degradations=config.data.val_degradations)
    table, noisies = _validation_table(net, subnets, pairs)
    sigmas = [pair_label(key) for _, key, _, _ in pairs]
    scales = [f"{pair_scale(name):g}" for name, _, _, _ in pairs]
    sweep = [_report(gate, table, noisies, mflops, delta, sigmas, scales) for delta, gate in gates.items()]
    shipped = choose_shipped(sweep, config.delta_db, config.auto_max_drop_db, config.auto_max_flops_fraction)
    rule = f"delta_db={config.delta_db}"
    if config.delta_db == "auto":
        rule += f", auto_max_drop_db={config.auto_max_drop_db}"
        if config.auto_max_flops_fraction is not None:
            rule += f", auto_max_flops_fraction={config.auto_max_flops_fraction}"
    report = {"shipped": shipped, "shipped_rule": rule, "delta_sweep": sweep,
              "subnets": [s.to_dict() for s in subnets]}
    (out_dir / REPORT_FILE).write_text(json.dumps(report, indent=2))
    log.write(report=shipped, seconds=round(time.time() - started, 1))

    record = stage_record(config, steps=config.steps, seconds=time.time() - started, data=data_sha256,
                          source_sha256=checkpoint.tensors_sha256, delta_db=shipped["delta_db"],
                          val_accuracy=shipped["accuracy"])
    written = provenance(checkpoint.provenance, "gate", record, config.recipe)
    dtype = {"float32": torch.float32, "float16": torch.float16}[config.save_dtype]
    gate = gates[shipped["delta_db"]]
    path = out_dir / GATED_FILE
    save_checkpoint(path, net, gate, subnets, gate_trained=True, provenance=written, dtype=dtype)
    return path
