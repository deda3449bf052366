"""Static baselines: each tailored shape trained alone, from scratch, on stage 1's schedule.

The comparison that tells whether weight sharing pays: a dynamic network's sub-network against a static
network of the same shape (the same FLOPs) trained by itself. ``train_static`` trains one network per row
of a tailored checkpoint's table, at that row's widths only, with the same loss, crops, noise and
schedule as stage 1, and writes ``table.json``: each shape's validation PSNR, static and shared.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from model.checkpoint import Subnet, load_checkpoint, save_checkpoint
from model.gate import Gate, GateConfig
from model.supernet import SlimUNet
from training.common import JsonLog, psnr_by_sigma
from training.compute import Compute
from training.config import CONFIG_FILE, StaticStage, save_config
from training.data import validation_pairs
from training.loop import Batches, Ema, Loop, cosine_lr, crop_for_step, run_loop
from training.provenance import data_digests, provenance, stage_record
from training.supernet import check_loss, reconstruction_loss

TABLE_FILE = "table.json"


def train_one(config: StaticStage, widths: tuple[int, ...], template: SlimUNet, log: JsonLog, index: int,
              compute: Compute, batches: Batches) -> SlimUNet:
    """Train a fresh network at ``widths`` only; returns its EMA (in eval mode). Every shape sees the same
    crops and noise: ``batches`` start again from the run's seed."""
    torch.manual_seed(config.seed + index)
    net = compute.module(SlimUNet(template.config))
    ema = Ema(net, compute.module(SlimUNet(template.config)), config.ema_decay)
    optimizer = torch.optim.Adam(net.parameters(), lr=config.lr)
    batches.reseed()

    def train_step(clean: torch.Tensor, noisy: torch.Tensor) -> dict:
        optimizer.zero_grad(set_to_none=True)
        with compute.autocast():
            loss = reconstruction_loss(config.loss, net(noisy, widths).float(), clean, eps=config.log_mse_eps)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), config.grad_clip)
        optimizer.step()
        return {"loss": round(loss.item(), 6)}

    loop = Loop(
        f"static {index}", config.steps, train_step, [optimizer],
        lr=lambda at: cosine_lr(at, config.steps, config.lr, config.lr_min, config.warmup_steps),
        shape=lambda at: crop_for_step(config.crop_schedule, at, config.steps), log=log,
        log_every=config.log_every, log_fields={"static": index}, ema=ema,
    )
    run_loop(loop, batches)
    return ema.module.eval()


def train_static(config: StaticStage) -> Path:
    """Train a static network of every shape in ``config.tailored``'s table; returns the ``table.json`` path.

    Writes, in ``out_dir``: ``static-K.safetensors`` (a checkpoint of shape K, its table one row long),
    ``config.yaml``, ``log.jsonl`` and ``table.json``.
    """
    check_loss(config.loss)
    out_dir = Path(config.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_config(config, out_dir / CONFIG_FILE)
    source = load_checkpoint(config.tailored)
    compute = Compute(config.compute)
    log = JsonLog(out_dir / "log.jsonl")
    val_pairs = validation_pairs(config.data)
    shared = compute.module(source.net).eval()
    batches = Batches.for_run(config.data, config.seed, compute)
    data_sha256, source_sha256 = data_digests(config.data), source.tensors_sha256
    rows = []
    for index, subnet in enumerate(source.subnets):
        started = time.time()
        ema = train_one(config, subnet.widths, source.net, log, index, compute, batches)
        static_psnr = psnr_by_sigma(ema, subnet.widths, val_pairs)
        rows.append({"subnet": index, "widths": list(subnet.widths), "mflops_per_pixel": subnet.mflops_per_pixel,
                     "static_psnr": static_psnr, "shared_psnr": psnr_by_sigma(shared, subnet.widths, val_pairs)})
        log.write(table_row=rows[-1], seconds=round(time.time() - started, 1))
        record = stage_record(config, steps=config.steps, seconds=time.time() - started, data=data_sha256,
                              source_sha256=source_sha256, subnet=index)
        save_checkpoint(out_dir / f"static-{index}.safetensors", ema, Gate(GateConfig(num_subnets=1)),
                        [Subnet(subnet.widths, subnet.mflops_per_pixel, static_psnr)], gate_trained=False,
                        provenance=provenance(None, "supernet", record, config.recipe))
    path = out_dir / TABLE_FILE
    path.write_text(json.dumps(rows, indent=2))
    return path
