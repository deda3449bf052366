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
from tqdm import tqdm

from model.checkpoint import Subnet, load_checkpoint, save_checkpoint
from model.gate import Gate, GateConfig
from model.supernet import SlimUNet
from training.common import JsonLog, cosine_lr, psnr_by_sigma
from training.compute import Compute, next_batch, worker_batches
from training.config import CONFIG_FILE, StaticStage, save_config
from training.data import PatchSampler, fixed_noisy_set
from training.provenance import data_digests, provenance, stage_record
from training.supernet import check_loss, crop_for_step, reconstruction_loss

TABLE_FILE = "table.json"


def train_one(config: StaticStage, widths: tuple[int, ...], template: SlimUNet, log: JsonLog, index: int,
              compute: Compute, sampler: PatchSampler) -> SlimUNet:
    """Train a fresh network at ``widths`` only; returns its EMA (in eval mode). Every shape sees the same
    crops and noise: ``sampler`` and the noise generator start again from the run's seed."""
    torch.manual_seed(config.seed + index)
    net = compute.module(SlimUNet(template.config))
    ema = compute.module(SlimUNet(template.config))
    ema.load_state_dict(net.state_dict())
    ema.requires_grad_(False)
    optimizer = torch.optim.Adam(net.parameters(), lr=config.lr)
    data = config.data
    sampler.rng.seed(config.seed)
    generator = torch.Generator().manual_seed(config.seed)
    batches = None
    if config.compute.workers:
        batches = worker_batches(data, config.seed, 0, config.steps,
                                 lambda at: crop_for_step(config.crop_schedule, at, config.steps),
                                 config.compute.workers, pin_memory=compute.device.type == "cuda")
    started = time.time()
    for step in tqdm(range(config.steps), desc=f"static {index}", dynamic_ncols=True):
        crop, batch = crop_for_step(config.crop_schedule, step, config.steps)
        lr = cosine_lr(step, config.steps, config.lr, config.lr_min, config.warmup_steps)
        for group in optimizer.param_groups:
            group["lr"] = lr
        clean, noisy = next_batch(batches, sampler, data, generator, batch, crop, compute)
        optimizer.zero_grad(set_to_none=True)
        with compute.autocast():
            loss = reconstruction_loss(config.loss, net(noisy, widths).float(), clean, eps=config.log_mse_eps)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), config.grad_clip)
        optimizer.step()
        with torch.no_grad():
            for ema_param, param in zip(ema.parameters(), net.parameters()):
                ema_param.lerp_(param, 1 - config.ema_decay)
        if (step + 1) % config.log_every == 0 or step + 1 == config.steps:
            log.write(static=index, step=step + 1, lr=lr, loss=round(loss.item(), 6),
                      seconds=round(time.time() - started, 1))
    return ema.eval()


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
    val_pairs = fixed_noisy_set(config.data.val_dir, config.data.val_sigmas, config.data.val_seed,
                                scales=config.data.val_scales, degradations=config.data.val_degradations)
    shared = compute.module(source.net).eval()
    sampler = PatchSampler(config.data.train_dir, seed=config.seed, scale_range=config.data.scale_range,
                           texture_candidates=config.data.texture_candidates)
    data_sha256, source_sha256 = data_digests(config.data), source.tensors_sha256
    rows = []
    for index, subnet in enumerate(source.subnets):
        started = time.time()
        ema = train_one(config, subnet.widths, source.net, log, index, compute, sampler)
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
