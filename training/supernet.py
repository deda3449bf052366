"""Stage 1: train the weight-shared slimmable supernet with the sandwich rule and in-place distillation.

Every step trains the widest configuration on the clean target, then the slimmest and
``random_widths`` random per-group configurations on the clean target plus the widest's detached output.
Gradients of all members accumulate into one Adam step. An EMA of the weights is what gets exported.
"""

from __future__ import annotations

import random
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from model.checkpoint import Subnet, load_checkpoint, save_checkpoint
from model.flops import supernet_mflops_per_pixel
from model.gate import Gate, GateConfig
from model.supernet import SlimUNet, SupernetConfig, WidthConfig
from training.common import (
    JsonLog,
    load_train_state,
    psnr_by_sigma,
    read_state_meta,
    rng_state,
    save_train_state,
)
from training.compute import Compute
from training.config import CONFIG_FILE, SandwichLoss, SupernetStage, save_config
from training.data import PatchSampler, validation_pairs
from training.distributed import ONE_PROCESS, World
from training.loop import Batches, Ema, Loop, cosine_lr, crop_for_step, run_loop
from training.provenance import data_digests, provenance, stage_record

STATE_FILE = "state.safetensors"
EXPORT_FILE = "supernet.safetensors"


LOSSES = ("l1", "log_mse")


def check_loss(kind: str) -> None:
    """Refuse an unknown loss name before any work is done."""
    if kind not in LOSSES:
        raise ValueError(f"unknown loss {kind!r}; choose from {', '.join(LOSSES)}")


def check_save_every(save_every: int) -> None:
    """Refuse a state-saving interval that is not a positive number of steps, before any work is done."""
    if not isinstance(save_every, int) or isinstance(save_every, bool) or save_every < 1:
        raise ValueError(f"save_every must be a positive number of steps, not {save_every!r}")


def reconstruction_loss(kind: str, output: torch.Tensor, clean: torch.Tensor, teacher: torch.Tensor | None = None,
                        distill_weight: float = 0.0, eps: float = 1e-6) -> torch.Tensor:
    """The stage-1 loss of one batch member's output, against the clean image and optionally the teacher.

    ``l1``: L1 to the clean image plus ``distill_weight`` times L1 to the teacher, batch means.
    ``log_mse``: per image, ``log(MSE to clean + distill_weight * MSE to teacher + eps)``, then the batch mean.
    Its gradient is each image's MSE gradient divided by that image's error, so an image at sigma 5 weighs as
    much as one at sigma 50 (mean PSNR is what we measure); ``eps`` caps the weight of near-perfect outputs.
    """
    check_loss(kind)
    if kind == "l1":
        loss = F.l1_loss(output, clean)
        if teacher is not None and distill_weight:
            loss = loss + distill_weight * F.l1_loss(output, teacher)
        return loss
    error = (output - clean).square().flatten(1).mean(1)
    if teacher is not None and distill_weight:
        error = error + distill_weight * (output - teacher).square().flatten(1).mean(1)
    return torch.log(error + eps).mean()


def sandwich_backward(net: SlimUNet, noisy: torch.Tensor, clean: torch.Tensor, members: list[WidthConfig],
                      config: SandwichLoss, world: World = ONE_PROCESS) -> tuple[float, list[float]]:
    """Accumulate one sandwich step's gradients and clip them; returns the widest's loss and each member's.

    The widest learns from the clean image, its loss weighted by ``config.widest_weight``; every member from
    the clean image and, in-place distillation, from the widest's detached output. The losses returned are
    unweighted. In a data-parallel ``world`` the batch is this process's rows, and the accumulated gradients
    are averaged over the processes before the clipping, which then sees the global batch's gradient.
    """
    # Under bf16 autocast the outputs are bfloat16; the losses are computed in float32.
    teacher = net(noisy, net.widest()).float()
    loss_widest = reconstruction_loss(config.loss, teacher, clean, eps=config.log_mse_eps)
    (config.widest_weight * loss_widest).backward()
    teacher = teacher.detach()
    member_losses = []
    for widths in members:
        member_loss = reconstruction_loss(config.loss, net(noisy, widths).float(), clean, teacher,
                                          config.distill_weight, config.log_mse_eps)
        member_loss.backward()
        member_losses.append(member_loss.item())
    world.average_gradients(net.parameters())
    torch.nn.utils.clip_grad_norm_(net.parameters(), config.grad_clip)
    return loss_widest.item(), member_losses


def save_state(path: Path, net, ema, optimizer, step: int, sampler: PatchSampler, generator, width_rng, elapsed: float,
               source_sha256: str = "") -> None:
    """Everything needed to resume, in safetensors (no pickle): weights, EMA, Adam moments, counters, and the
    tensor digest of the checkpoint the run started from (``init_from``)."""
    meta = {"step": step, "elapsed_s": elapsed, "width_rng": width_rng.getstate(), "model": net.config.to_dict(),
            "source_sha256": source_sha256}
    save_train_state(path, {"net": net, "ema": ema}, optimizer, generator, sampler, meta)


def load_state(path: Path, net, ema, optimizer, sampler: PatchSampler, generator, width_rng
               ) -> tuple[int, float, str]:
    """Restore what :func:`save_state` wrote; returns the step, the elapsed seconds and the source's digest."""
    meta = read_state_meta(path)
    if SupernetConfig.from_dict(meta["model"]) != net.config:
        raise ValueError(f"{path} was saved for model {meta['model']}, the config asks for {net.config.to_dict()}")
    load_train_state(path, {"net": net, "ema": ema}, optimizer, generator, sampler)
    if "width_rng" in meta:
        width_rng.setstate(rng_state(meta["width_rng"]))
    else:  # states written before the width sampler was saved
        width_rng.seed(int(meta["step"]))
    return int(meta["step"]), float(meta["elapsed_s"]), str(meta.get("source_sha256", ""))


def export_supernet(path: Path, ema: SlimUNet, provenance: dict) -> None:
    """Write the EMA supernet as a ddsnet checkpoint with its widest and slimmest as the table."""
    subnets = [
        Subnet(widths, supernet_mflops_per_pixel(ema, widths)) for widths in (ema.widest(), ema.slimmest())
    ]
    gate = Gate(GateConfig(num_subnets=len(subnets)))
    save_checkpoint(path, ema, gate, subnets, gate_trained=False, provenance=provenance)


def train_supernet(config: SupernetStage, resume: bool = False, world: World = ONE_PROCESS) -> Path:
    """Run (or continue) stage 1; returns the exported checkpoint path.

    ``world``: the processes of a data-parallel run (``torchrun``), each of which calls this; rank 0 writes
    the files.
    """
    check_loss(config.loss)
    check_save_every(config.save_every)
    out_dir = Path(config.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if world.main:
        save_config(config, out_dir / CONFIG_FILE)
    # The same seed everywhere: every process starts from the same weights.
    torch.manual_seed(config.seed)
    compute = Compute(config.compute, world)
    net = compute.module(SlimUNet(SupernetConfig.from_dict(config.model)))
    ema = Ema(net, compute.module(SlimUNet(net.config)), config.ema_decay)
    optimizer = torch.optim.Adam(net.parameters(), lr=config.lr)
    batches = Batches.for_run(config.data, config.seed, compute)
    width_rng = random.Random(config.seed + 1)
    val_pairs = validation_pairs(config.data, config.data.val_crop)
    log = JsonLog(out_dir / "log.jsonl")

    step, elapsed, init_sha256 = 0, 0.0, ""
    if config.init_from and not resume:
        init_sha256 = init_weights(config.init_from, net, ema.module)
    data_sha256 = data_digests(config.data)
    state_path = out_dir / STATE_FILE
    if resume:
        step, elapsed, init_sha256 = load_state(state_path, net, ema.module, optimizer, batches.sampler,
                                                batches.generator, width_rng)
    widest, slimmest = net.widest(), net.slimmest()

    def train_step(clean: torch.Tensor, noisy: torch.Tensor) -> dict:
        optimizer.zero_grad(set_to_none=True)
        members = [slimmest] + [net.random_widths(width_rng) for _ in range(config.random_widths)]
        with compute.autocast():
            loss_widest, member_losses = sandwich_backward(net, noisy, clean, members, config, world)
        optimizer.step()
        return {"loss_widest": round(loss_widest, 6), "loss_slimmest": round(member_losses[0], 6),
                "loss_random": [round(x, 6) for x in member_losses[1:]]}

    def validate() -> dict:
        ema.module.eval()
        return {"val_psnr_widest": psnr_by_sigma(ema.module, widest, val_pairs),
                "val_psnr_slimmest": psnr_by_sigma(ema.module, slimmest, val_pairs)}

    def save(at: int, seconds: float) -> None:
        save_state(state_path, net, ema.module, optimizer, at, batches.sampler, batches.generator, width_rng,
                   seconds, init_sha256)
        record = stage_record(config, steps=at, seconds=seconds, data=data_sha256, source_sha256=init_sha256)
        export_supernet(out_dir / EXPORT_FILE, ema.module, provenance(None, "supernet", record, config.recipe))

    loop = Loop(
        "supernet", config.steps, train_step, [optimizer],
        lr=lambda at: cosine_lr(at, config.steps, config.lr, config.lr_min, config.warmup_steps),
        shape=lambda at: crop_for_step(config.crop_schedule, at, config.steps), log=log,
        log_every=config.log_every, ema=ema, validate=validate, val_every=config.val_every, save=save,
        save_every=config.save_every, max_minutes=config.max_minutes, stop_at=config.stop_at,
    )
    run_loop(loop, batches, step, started=time.time() - elapsed)
    return out_dir / EXPORT_FILE


def init_weights(source_path: str, net: SlimUNet, ema: SlimUNet) -> str:
    """Start ``net`` and its EMA from a ddsnet checkpoint's supernet (``init_from``); returns its digest."""
    source = load_checkpoint(source_path)
    if source.net.config != net.config:
        raise ValueError(f"init_from {source_path}: its model {source.net.config} is not {net.config}")
    net.load_state_dict(source.net.state_dict())
    ema.load_state_dict(source.net.state_dict())
    return source.tensors_sha256
