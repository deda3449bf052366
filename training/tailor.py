"""Stage 2: progressive channel tailoring (AutoSlim-style greedy search) in one pass.

Starting from the widest configuration, each iteration tries cutting every slimmable group by one step
on a fixed validation batch and keeps the cut that costs the least PSNR. Whenever the FLOPs fall under the
next target fraction, the configuration is recorded. The result is a table of K sub-networks, widest first.
Optionally (``finetune_steps``) the supernet is then fine-tuned on those K configurations only, so that the
weights it shares serve the configurations that ship rather than every possible one; the fine-tune saves
its state as it goes and continues with ``--resume``, like stage 1. ``refill`` first gives back what the
cuts overshot: it widens each sub-network, a step at a time, as far as its FLOPs target allows. Under
``torchrun`` the fine-tune is data-parallel (:mod:`training.distributed`); every process runs the search, rank
0's configurations are the ones trained, and rank 0 writes the tables and the checkpoint.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

import torch
from tqdm import tqdm

from model.checkpoint import DEFAULT_PROFILE, Checkpoint, Subnet, load_checkpoint, save_checkpoint
from model.flops import supernet_mflops_per_pixel
from model.gate import Gate, GateConfig
from model.metrics import psnr
from model.supernet import SlimUNet, SupernetConfig, WidthConfig, WidthGroup
from training.common import (
    JsonLog,
    load_train_state,
    psnr_by_sigma,
    read_state_meta,
    save_train_state,
)
from training.compute import Compute
from training.config import CONFIG_FILE, ProfileStage, TailorStage, save_config
from training.data import fixed_noisy_set, validation_pairs
from training.distributed import ONE_PROCESS, World, end_collectives
from training.loop import Batches, Loop, cosine_lr, run_loop
from training.provenance import data_digests, provenance, stage_record
from training.supernet import check_loss, check_save_every, sandwich_backward

TAILORED_FILE = "tailored.safetensors"
FINETUNE_STATE_FILE = "finetune_state.safetensors"


def search_batch(config: TailorStage) -> tuple[torch.Tensor, torch.Tensor]:
    """The fixed validation batch ``(clean, noisy)``: a centre crop of every image at every search sigma."""
    pairs = fixed_noisy_set(config.data.val_dir, config.search_sigmas, config.data.val_seed, config.search_crop)
    side = min(min(clean.shape[-2:]) for _, _, clean, _ in pairs)
    side -= side % 8
    clean = torch.cat([c[..., :side, :side] for _, _, c, _ in pairs])
    noisy = torch.cat([n[..., :side, :side] for _, _, _, n in pairs])
    return clean, noisy


def search_score(net: SlimUNet, config: TailorStage) -> Callable[[WidthConfig], float]:
    """Mean PSNR of a configuration on the fixed validation batch: what the cuts and refills are chosen by."""
    device = next(net.parameters()).device
    clean, noisy = (tensor.to(device) for tensor in search_batch(config))

    @torch.inference_mode()
    def score(widths: WidthConfig) -> float:
        return psnr(net(noisy, widths), clean).mean().item()

    return score


def greedy_tailor(
    groups: tuple[WidthGroup, ...],
    start: WidthConfig,
    score: Callable[[WidthConfig], float],
    cost: Callable[[WidthConfig], float],
    targets: list[float],
    criterion: str = "psnr",
    on_cut: Callable[[dict], None] | None = None,
) -> list[WidthConfig]:
    """Cut one group by one step at a time, keeping the cheapest cut in ``score``, until every target is met.

    Args:
        groups: the slimmable groups (their steps and minimum widths bound the search).
        start: the widest configuration, always the first one returned.
        score: PSNR (higher is better) of a configuration on the fixed batch.
        cost: FLOPs of a configuration.
        targets: fractions of ``cost(start)``, descending; a configuration is recorded as it drops under each.
        criterion: ``"psnr"`` keeps the cut with the highest score; ``"psnr_per_flop"`` the smallest
            PSNR loss per FLOP saved.

    Returns:
        ``[start, config under targets[0], config under targets[1], ...]``.
    """
    if criterion not in ("psnr", "psnr_per_flop"):
        raise ValueError(f"unknown tailoring criterion {criterion!r}")
    current, full_cost = tuple(start), cost(start)
    current_score = score(current)
    recorded, pending = [current], sorted(targets, reverse=True)
    while pending:
        candidates = []
        for index, group in enumerate(groups):
            if current[index] - group.step < group.min_width:
                continue
            cut = current[:index] + (current[index] - group.step,) + current[index + 1 :]
            candidates.append((cut, index, score(cut)))
        if not candidates:
            raise ValueError(f"cannot reach FLOPs target {pending[0]}: every group is at its minimum")

        if criterion == "psnr":
            ranks = [cut_score for _, _, cut_score in candidates]
        else:
            current_cost = cost(current)
            ranks = [-(current_score - s) / max(current_cost - cost(cut), 1e-9) for cut, _, s in candidates]
        current, index, current_score = candidates[max(range(len(candidates)), key=ranks.__getitem__)]
        fraction = cost(current) / full_cost
        if on_cut:
            on_cut({"group": groups[index].name, "widths": list(current), "score": current_score, "fraction": fraction})
        while pending and fraction <= pending[0]:
            recorded.append(current)
            pending.pop(0)
    return recorded


def greedy_refill(
    groups: tuple[WidthGroup, ...],
    start: WidthConfig,
    ceiling: WidthConfig,
    score: Callable[[WidthConfig], float],
    cost: Callable[[WidthConfig], float],
    limit: float,
    on_step: Callable[[dict], None] | None = None,
) -> WidthConfig:
    """Give back channel steps to ``start`` while its FLOPs stay within ``limit``: the inverse of a cut.

    The greedy search records the first configuration under each target, which can sit up to one cut's
    FLOPs below it. Each step here tries widening every group by one step (never past ``ceiling``, the
    configuration before this one) and keeps the widening that raises ``score`` most among those that cost
    at most ``limit``; it stops when none fits or none raises ``score``.

    Returns:
        The refilled configuration (``start`` itself where nothing fits or helps).
    """
    current = tuple(start)
    current_score = score(current)
    while True:
        candidates = []
        for index, group in enumerate(groups):
            if current[index] + group.step > ceiling[index]:  # a valid configuration, so never past full
                continue
            wider = current[:index] + (current[index] + group.step,) + current[index + 1 :]
            if cost(wider) <= limit:
                candidates.append((score(wider), index, wider))
        if not candidates:
            return current
        best_score, index, wider = max(candidates)
        if best_score <= current_score:
            return current
        current, current_score = wider, best_score
        if on_step:
            on_step({"refill_group": groups[index].name, "widths": list(current), "score": current_score,
                     "cost": cost(current)})


def refill_configurations(net: SlimUNet, configs: list[WidthConfig], config: TailorStage, log: JsonLog,
                          started: float) -> list[WidthConfig]:
    """``configs[i]`` (i >= 1) refilled up to ``targets[i-1]`` of the widest's FLOPs, within ``configs[i-1]``.

    Scored on the search's fixed validation batch, as the cuts are.
    """
    score = search_score(net, config)

    def cost(widths: WidthConfig) -> float:
        return supernet_mflops_per_pixel(net, widths)

    full = cost(configs[0])
    refilled = [configs[0]]
    for i, (widths, target) in enumerate(zip(configs[1:], config.targets, strict=True), start=1):
        limit = min(target * full, cost(refilled[-1]) * (1 - 1e-9))  # FLOPs must still fall strictly
        new = greedy_refill(net.groups, widths, refilled[-1], score, cost, limit,
                            lambda record, i=i: log.write(subnet=i, **record))
        log.write(refilled=i, widths=list(new), fraction=cost(new) / full, was=list(widths),
                  was_fraction=cost(widths) / full, seconds=round(time.time() - started, 1))
        refilled.append(new)
    return refilled


def _search(net: SlimUNet, config: TailorStage, log: JsonLog, started: float) -> list[WidthConfig]:
    """The greedy search on the fixed validation batch, each cut logged and shown on a progress bar."""
    score = search_score(net, config)
    progress = tqdm(desc="tailor (cuts)", dynamic_ncols=True)

    def on_cut(record: dict) -> None:
        progress.update(1)
        progress.set_postfix(flops=f"{record['fraction']:.2f}", psnr=f"{record['score']:.2f}")
        log.write(**record, seconds=round(time.time() - started, 1))

    configs = greedy_tailor(
        net.groups, net.widest(), score, lambda w: supernet_mflops_per_pixel(net, w), config.targets,
        config.criterion, on_cut,
    )
    progress.close()
    return configs


def source_profile(checkpoint: Checkpoint, source: str, name: str) -> str:
    """The profile of ``checkpoint`` that a run starts from: ``name``, or the first where it is empty."""
    if not name:
        return checkpoint.profiles[0]
    if name not in checkpoint.nets:
        raise ValueError(f"source_profile: {source} has no profile {name!r}; its profiles are {checkpoint.profiles}")
    return name


def kept_configurations(checkpoint: Checkpoint, source: str, profile: str = "") -> list[WidthConfig]:
    """The K configurations of one profile (``profile``; empty: the first) of an already tailored checkpoint's
    table (``search: false``), widest first."""
    profile = source_profile(checkpoint, source, profile)
    configs = [tuple(s.widths) for s in checkpoint.subnets if s.profile == profile]
    stages = checkpoint.provenance.get("stages", {})
    tailored = "tailor" in stages or "tailor" in checkpoint.provenance  # the latter: provenance before ddsnet 0.2
    if not tailored or not configs or configs[0] != tuple(checkpoint.nets[profile].widest()):
        raise ValueError(f"{source}: search=false needs a tailored checkpoint (stage 2's or stage 3's output), "
                         "whose table lists the sub-networks to keep; this one has not been through stage 2")
    return configs


def given_configurations(net: SlimUNet, given: list[list[int]]) -> list[WidthConfig]:
    """``configs`` as the run's K configurations, checked: valid widths, the widest first, FLOPs falling."""
    if len(given) < 2:
        raise ValueError(f"configs: give at least 2 configurations (the widest first), not {len(given)}")
    configs = []
    for i, widths in enumerate(given):
        try:
            configs.append(net.validate(widths))
        except (TypeError, ValueError) as error:
            raise ValueError(f"configs[{i}]: {error}") from None
    if configs[0] != net.widest():
        raise ValueError(f"configs[0] must be the widest configuration {list(net.widest())}")
    cost = [supernet_mflops_per_pixel(net, c) for c in configs]
    for i in range(1, len(configs)):
        if cost[i] >= cost[i - 1]:
            raise ValueError(f"configs[{i}] ({cost[i]:.6f} MFLOPs/px) must cost less than configs[{i - 1}] "
                             f"({cost[i - 1]:.6f}): list the sub-networks widest first")
    return configs


def finetune(net: SlimUNet, configs: list[WidthConfig], config: TailorStage, log: JsonLog, state_path: Path,
             meta: dict, started: float, resume: bool = False, compute: Compute | None = None) -> int:
    """Train ``net`` in place on ``configs`` only (``configs[0]`` the widest): Adam, cosine LR to zero.

    The state (weights, Adam moments, RNGs and ``meta``: the configurations and the source's provenance) is
    saved to ``state_path`` every ``save_every`` steps, at the end, and when the run stops early after
    ``max_minutes`` or at ``stop_at``; ``resume`` continues from it. Returns the step it stopped at.
    ``compute`` places the batches (``net`` is already on its device); the default is the CPU.
    """
    compute = compute or Compute(config.compute)
    net.train().requires_grad_(True)
    optimizer = torch.optim.Adam(net.parameters(), lr=config.finetune_lr)
    batches = Batches.for_run(config.data, config.seed, compute)
    step = 0
    if resume:
        step = int(load_train_state(state_path, {"net": net}, optimizer, batches.generator, batches.sampler)["step"])
    members = configs[1:]

    def train_step(clean: torch.Tensor, noisy: torch.Tensor) -> dict:
        optimizer.zero_grad(set_to_none=True)
        with compute.autocast():
            loss_widest, member_losses = sandwich_backward(net, noisy, clean, members, config, compute.world)
        optimizer.step()
        return {"loss_widest": round(loss_widest, 6), "loss_members": [round(x, 6) for x in member_losses]}

    def save(at: int, seconds: float) -> None:
        save_train_state(state_path, {"net": net}, optimizer, batches.generator, batches.sampler,
                         {**meta, "step": at, "elapsed_s": seconds})

    loop = Loop(
        "tailor (fine-tune)", config.finetune_steps, train_step, [optimizer],
        lr=lambda at: cosine_lr(at, config.finetune_steps, config.finetune_lr),
        shape=lambda _: (config.finetune_crop, config.finetune_batch), log=log, log_every=config.log_every,
        step_key="finetune_step", save=save, save_every=config.save_every, max_minutes=config.max_minutes,
        stop_at=config.stop_at,
    )
    step = run_loop(loop, batches, step, started)
    net.eval().requires_grad_(False)
    return step


def _table(net: SlimUNet, configs: list[WidthConfig], val_pairs: list, desc: str,
           profile: str = DEFAULT_PROFILE) -> list[Subnet]:
    subnets = []
    for widths in tqdm(configs, desc=desc):
        mflops = round(supernet_mflops_per_pixel(net, widths), 6)
        subnets.append(Subnet(widths, mflops, psnr_by_sigma(net, widths, val_pairs), profile))
    return subnets


def _resumed(config: TailorStage, state_path: Path, compute: Compute
             ) -> tuple[SlimUNet, list[WidthConfig], dict, JsonLog, float]:
    """A stopped fine-tune reopened from its state: the network (weights loaded later, with the optimizer),
    its configurations, the state's meta, the log and the time the run's elapsed seconds count from."""
    meta = read_state_meta(state_path)
    log = JsonLog(Path(config.out_dir) / "log.jsonl", enabled=compute.world.main)
    net = compute.module(SlimUNet(SupernetConfig.from_dict(meta["model"])))
    configs = [tuple(c) for c in meta["configs"]]
    started = time.time() - float(meta["elapsed_s"])
    resumes = meta.get("resumes", 0)
    meta["resumes"] = (len(resumes) if isinstance(resumes, list) else int(resumes)) + 1
    meta.setdefault("source_sha256", "")
    meta.setdefault("data_sha256", data_digests(config.data, train=True))
    if compute.world.main:
        save_config(config, Path(config.out_dir) / CONFIG_FILE)
    log.write(resumed_at_step=int(meta["step"]), seconds=round(time.time() - started, 1))
    return net, configs, meta, log, started


def _fresh(config: TailorStage, compute: Compute) -> tuple[SlimUNet, list[WidthConfig], dict, JsonLog, float]:
    """The supernet loaded and its K configurations found (searched, kept or given, then refilled)."""
    checkpoint = load_checkpoint(config.supernet)
    # A tailor run starts from the first profile; a profile run from the one it names.
    profile = source_profile(checkpoint, config.supernet, getattr(config, "source_profile", ""))
    net = compute.module(checkpoint.nets[profile])
    if config.configs and config.search:
        raise ValueError("configs lists the sub-networks to keep instead of searching; set search=false too")
    kept = None  # checked before anything is written
    if config.configs:
        kept = given_configurations(net, config.configs)
    elif not config.search:
        kept = kept_configurations(checkpoint, config.supernet, profile)
    if config.refill and kept is not None and len(config.targets) != len(kept) - 1:
        raise ValueError(f"refill: targets gives {len(config.targets)} FLOPs fractions for the "
                         f"{len(kept) - 1} sub-networks after the widest; give one for each")
    if compute.world.main:
        save_config(config, Path(config.out_dir) / CONFIG_FILE)
    log = JsonLog(Path(config.out_dir) / "log.jsonl", enabled=compute.world.main)
    started = time.time()
    if kept is None:
        configs = _search(net, config, log, started)
    else:
        configs = kept
        log.write(kept_configurations=[list(c) for c in configs], seconds=round(time.time() - started, 1))
    if config.refill:
        configs = refill_configurations(net, configs, config, log, started)
    meta = {"model": net.config.to_dict(), "configs": [list(c) for c in configs],
            "provenance": checkpoint.provenance, "source_sha256": checkpoint.tensors_sha256,
            "data_sha256": data_digests(config.data, train=config.finetune_steps > 0)}
    return net, configs, meta, log, started


def tailor(config: TailorStage, resume: bool = False, world: World = ONE_PROCESS) -> Path:
    """Run stage 2 on the supernet checkpoint; writes the tailored checkpoint and ``table.json``.

    With ``finetune_steps`` the table is measured before the fine-tune too (``table_before_finetune.json``),
    so what the fine-tune bought is on record. A fine-tune stopped early (``max_minutes``, ``stop_at``)
    returns its state file instead; ``resume`` continues it from there, with the configurations and
    provenance the state holds, and then writes the table and the checkpoint. ``world``: the processes of a
    data-parallel fine-tune (``torchrun``), each of which calls this; rank 0 writes the files.
    """
    check_loss(config.loss)
    check_save_every(config.save_every)
    out_dir = Path(config.out_dir)
    state_path = out_dir / FINETUNE_STATE_FILE
    compute = Compute(config.compute, world)
    opened = _resumed(config, state_path, compute) if resume else _fresh(config, compute)
    net, configs, meta, log, started = opened
    # Rank 0's search decides: the processes' scores could differ in the last bit on different devices.
    configs = world.share(configs)

    val_pairs = validation_pairs(config.data, config.val_crop or None)
    if config.finetune_steps > 0:
        if not resume and world.main:
            before = [s.to_dict() for s in _table(net, configs, val_pairs, "tailor (validation, before fine-tune)")]
            (out_dir / "table_before_finetune.json").write_text(json.dumps(before, indent=2))
            log.write(table_before_finetune=before, seconds=round(time.time() - started, 1))
        step = finetune(net, configs, config, log, state_path, meta, started, resume, compute)
        if step < config.finetune_steps:
            log.write(stopped_at_step=step, seconds=round(time.time() - started, 1))
            if world.main:
                tqdm.write(f"fine-tune stopped at step {step} of {config.finetune_steps}; continue with "
                           f"`ddsnet-train tailor --resume --set out_dir={out_dir}`")
            return state_path
    end_collectives(world)
    if not world.main:  # rank 0 measures the table and writes the checkpoint
        return out_dir / TAILORED_FILE
    profile = config.profile if isinstance(config, ProfileStage) else DEFAULT_PROFILE
    subnets = _table(net, configs, val_pairs, "tailor (validation)", profile)
    table = [s.to_dict() for s in subnets]
    (out_dir / "table.json").write_text(json.dumps(table, indent=2))
    log.write(table=table, seconds=round(time.time() - started, 1))

    # The configurations came from a search, the source's own table, or the config's ``configs`` list.
    origin = "search" if config.search else "given" if config.configs else "kept"
    record = stage_record(config, steps=config.finetune_steps, seconds=time.time() - started,
                          data=meta["data_sha256"], source_sha256=meta["source_sha256"],
                          configurations=origin, resumes=int(meta.get("resumes", 0)))
    stage = "tailor" if profile == DEFAULT_PROFILE else "profile"
    if stage == "profile":
        record["profile"] = profile
    written = provenance(meta["provenance"], stage, record, config.recipe)
    gate = Gate(GateConfig(num_subnets=len(subnets)))
    path = out_dir / TAILORED_FILE
    save_checkpoint(path, net, gate, subnets, gate_trained=False, provenance=written)
    return path
