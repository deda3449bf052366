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

import dataclasses
import json
import random
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from model.checkpoint import Subnet, load_checkpoint, save_checkpoint
from model.flops import gate_macs
from model.gate import Gate, GateConfig, choose
from model.metrics import psnr
from model.supernet import SlimUNet
from model.tiling import denoise_whole
from training.common import JsonLog
from training.compute import Compute
from training.config import CONFIG_FILE, GateStage, save_config
from training.data import pair_label, pair_scale, validation_pairs
from training.loop import Batches, Loop, cosine_lr, run_loop
from training.provenance import data_digests, provenance, stage_record, with_last_stage_of

GATED_FILE = "ddsnet.safetensors"
SAVE_DTYPES = {"float32": torch.float32, "float16": torch.float16}
REPORT_FILE = "report.json"


def smallest_within(psnrs: torch.Tensor, mflops: torch.Tensor, delta: float,
                    widest: list[int] | None = None) -> torch.Tensor:
    """The label rule: per row, the cheapest sub-network whose PSNR >= the best widest's PSNR - ``delta``.

    Args:
        psnrs: ``(B, K)`` PSNR of every sub-network on every sample.
        mflops: ``(K,)`` cost of each sub-network.
        delta: tolerance in dB.
        widest: the column of each profile's widest sub-network; the reference is the best of them on each
            sample. Default: the most expensive column (one profile).

    Returns:
        ``(B,)`` int64 labels (indices into the K sub-networks).
    """
    widest = [int(mflops.argmax())] if widest is None else widest
    reference = psnrs[:, widest].amax(dim=1, keepdim=True)
    good = psnrs >= reference - delta
    cost = torch.where(good, mflops.expand_as(psnrs), torch.full_like(psnrs, float("inf")))
    return cost.argmin(dim=1)


@dataclass
class Choices:
    """What the gate chooses among: every (profile, width) sub-network, each profile's supernet."""

    nets: dict[str, SlimUNet]
    subnets: list[Subnet]

    def __post_init__(self) -> None:
        self.profiles = list(self.nets)
        self.mflops = torch.tensor([s.mflops_per_pixel for s in self.subnets])
        self.profile_of = torch.tensor([self.profiles.index(s.profile) for s in self.subnets])
        self.groups = [[i for i, s in enumerate(self.subnets) if s.profile == name] for name in self.profiles]

        def extreme(pick, name: str) -> int:
            rows = [i for i, s in enumerate(self.subnets) if s.profile == name]
            return pick(rows, key=lambda i: self.subnets[i].mflops_per_pixel)

        self.widest = [extreme(max, name) for name in self.profiles]
        self.slimmest = [extreme(min, name) for name in self.profiles]

    def net(self, index: int) -> SlimUNet:
        return self.nets[self.subnets[index].profile]


def load_choices(config: GateStage) -> tuple[Choices, dict | None, dict[str, str]]:
    """The tailored checkpoint's profiles and rows, then those of each of ``config.profiles`` (name -> a
    profile stage's checkpoint, its rows relabelled with the name). A name that is already a profile of the
    tailored checkpoint, the first included, replaces that profile's weights and rows in place, so any profile
    of a gated checkpoint can be re-made.

    Returns them, the provenance that the gated checkpoint continues (the tailored checkpoint's, with the stage
    that made each given profile in place of its own record of that stage), and the ``tensors_sha256`` of
    every checkpoint read, by profile name (``tailored`` for the tailored one)."""
    checkpoint = load_checkpoint(config.tailored)
    nets = dict(checkpoint.nets)
    rows = {name: [s for s in checkpoint.subnets if s.profile == name] for name in nets}
    history, sources = checkpoint.provenance, {"tailored": checkpoint.tensors_sha256}
    for name, path in config.profiles.items():
        other = load_checkpoint(path)
        if other.net.config != checkpoint.net.config:
            raise ValueError(f"profiles: {path} has another architecture than {config.tailored}")
        nets[name] = other.net
        rows[name] = [dataclasses.replace(s, profile=name) for s in other.subnets if s.profile == other.profiles[0]]
        history, sources[name] = with_last_stage_of(history, other.provenance), other.tensors_sha256
    return Choices(nets, [s for name in nets for s in rows[name]]), history, sources


@torch.inference_mode()
def subnet_psnrs(choices: Choices, noisy: torch.Tensor, clean: torch.Tensor) -> torch.Tensor:
    """``(B, K)`` PSNR of each sub-network on a batch."""
    return torch.stack([psnr(choices.net(i)(noisy, s.widths), clean) for i, s in enumerate(choices.subnets)], dim=1)


def _validation_table(choices: Choices, pairs) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Per validation pair: PSNR of every sub-network ``(N, K)`` and the noisy inputs."""
    rows = []
    device = next(choices.net(0).parameters()).device
    for _, _, clean, noisy in tqdm(pairs, desc="gate (validation PSNRs)"):
        clean, on_device = clean.to(device), noisy.to(device)
        rows.append(torch.stack([psnr(denoise_whole(choices.net(i), on_device, s.widths), clean)[0]
                                 for i, s in enumerate(choices.subnets)]).cpu())
    return torch.stack(rows), [noisy for _, _, _, noisy in pairs]


def _report(gate: Gate, table: torch.Tensor, noisies: list, choices: Choices, delta: float, sigmas,
            scales) -> dict:
    """Accuracy, confusion matrices, and auto/best/fast PSNR and FLOPs on the validation pairs, overall, per
    noise (``sigmas``: labels such as ``"25"`` or ``"jpeg80-awgn15"``) and per view scale (labels).

    ``best`` and ``fast`` are each profile's widest and slimmest, the better profile on each pair; the profile
    is right where the gate picks the profile whose widest does better.
    """
    gate.eval()
    device = next(gate.parameters()).device
    with torch.inference_mode():
        picks = torch.tensor([int(choose(gate(noisy.to(device)), choices.groups)[0]) for noisy in noisies])
    mflops = choices.mflops
    labels = smallest_within(table, mflops, delta, choices.widest)
    k = len(mflops)
    confusion = torch.zeros(k, k, dtype=torch.int64)
    for label, pick in zip(labels.tolist(), picks.tolist()):
        confusion[label, pick] += 1
    rows = torch.arange(len(picks))
    gate_mflops = [2 * gate_macs(gate.config, *n.shape[-2:]) / n.shape[-1] / n.shape[-2] / 1e6 for n in noisies]
    best_psnr = table[:, choices.widest].amax(dim=1)
    fast_psnr = table[:, choices.slimmest].amax(dim=1)
    right_profile = table[:, choices.widest].argmax(dim=1)
    picked_profile = choices.profile_of[picks]
    auto_psnr = table[rows, picks]

    def breakdown(keys: list[str]) -> dict:
        groups = {}
        for key in dict.fromkeys(keys):  # in order of first appearance
            mask = torch.tensor([x == key for x in keys])
            groups[key] = {
                "auto_psnr": round(auto_psnr[mask].mean().item(), 4),
                "best_psnr": round(best_psnr[mask].mean().item(), 4),
                "fast_psnr": round(fast_psnr[mask].mean().item(), 4),
                "auto_mflops_per_pixel": round(mflops[picks[mask]].mean().item()
                                               + sum(gate_mflops) / len(gate_mflops), 6),
            }
            if len(choices.profiles) > 1:
                groups[key]["profile_accuracy"] = round((picked_profile[mask] == right_profile[mask]).float()
                                                        .mean().item(), 4)
        return groups

    report = {
        "delta_db": delta,
        "accuracy": round((picks == labels).float().mean().item(), 4),
        "confusion_matrix_label_by_pick": confusion.tolist(),
        "auto_psnr": round(auto_psnr.mean().item(), 4),
        "auto_mflops_per_pixel": round(mflops[picks].mean().item() + sum(gate_mflops) / len(gate_mflops), 6),
        "oracle_psnr": round(table[rows, labels].mean().item(), 4),
        "oracle_mflops_per_pixel": round(mflops[labels].mean().item(), 6),
        "best_psnr": round(best_psnr.mean().item(), 4),
        "best_mflops_per_pixel": round(mflops[choices.widest[0]].item(), 6),
        "fast_psnr": round(fast_psnr.mean().item(), 4),
        "fast_mflops_per_pixel": round(mflops[choices.slimmest[0]].item(), 6),
        "by_sigma": breakdown(list(sigmas)),
        "by_scale": breakdown(list(scales)),
    }
    if len(choices.profiles) > 1:
        profiles = torch.zeros(len(choices.profiles), len(choices.profiles), dtype=torch.int64)
        for right, picked in zip(right_profile.tolist(), picked_profile.tolist()):
            profiles[right, picked] += 1
        report["profiles"] = choices.profiles
        report["profile_accuracy"] = round((picked_profile == right_profile).float().mean().item(), 4)
        report["profile_confusion_right_by_pick"] = profiles.tolist()
    return report


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


def check_settings(config: GateStage) -> None:
    """Refuse gate settings out of range before anything is written."""
    if config.delta_db != "auto" and not isinstance(config.delta_db, int | float):
        raise ValueError(f"delta_db must be a number of dB or 'auto', not {config.delta_db!r}")
    if config.delta_db == "auto" and not config.delta_sweep:
        raise ValueError("delta_db: auto chooses among the delta_sweep gates, and delta_sweep is empty")
    fraction = config.auto_max_flops_fraction
    if fraction is not None and not (isinstance(fraction, int | float) and 0 < fraction <= 1):
        raise ValueError(f"auto_max_flops_fraction must be in (0, 1] of the widest's FLOPs, or null, not {fraction!r}")
    if config.save_dtype not in SAVE_DTYPES:
        raise ValueError(f"save_dtype must be one of {', '.join(SAVE_DTYPES)}, not {config.save_dtype!r}")


REPLAY_KEPT = 64  # labelled batches kept for ``replay``


def profile_targets(psnrs: torch.Tensor, choices: Choices) -> tuple[torch.Tensor, torch.Tensor]:
    """Per sample: the profile whose widest does best (an index into ``choices.profiles``), and what choosing
    the worst profile instead would give up, in dB."""
    widest = psnrs[:, choices.widest]
    return widest.argmax(dim=1), widest.amax(dim=1) - widest.amin(dim=1)


def gate_loss(logits: torch.Tensor, psnrs: torch.Tensor, choices: Choices, delta: float,
              config: GateStage) -> tuple[torch.Tensor, torch.Tensor]:
    """The loss of one gate on a labelled batch, and the labels it was trained towards.

    One profile: cross-entropy to the label (:func:`smallest_within`). Several: the decision is split as
    :func:`model.gate.choose` splits it. The profile's total probability is trained towards the profile whose
    widest does best, each sample weighed by 1 + the dB that the wrong profile would cost (JPEG noise sent to
    the white profile costs several dB, white noise sent to the compressed one a fraction); the widths within
    that profile towards its own label. Then ``cost_weight`` times the expected relative FLOPs and
    ``regret_weight`` times the expected PSNR given up against the best widest (dB).
    """
    cost = choices.mflops.to(psnrs.device)
    if len(choices.profiles) == 1:
        labels = smallest_within(psnrs, cost, delta, choices.widest)
        loss = F.cross_entropy(logits, labels)
    else:
        right, stakes = profile_targets(psnrs, choices)
        totals = torch.stack([logits[:, rows].logsumexp(dim=1) for rows in choices.groups], dim=1)
        loss = (F.cross_entropy(totals, right, reduction="none") * (1 + stakes)).mean()
        labels = torch.empty_like(right)
        for group, rows in enumerate(choices.groups):
            mine = right == group
            if mine.any():
                within = smallest_within(psnrs[mine][:, rows], cost[rows], delta)
                labels[mine] = torch.tensor(rows, device=psnrs.device)[within]
                loss = loss + F.cross_entropy(logits[mine][:, rows], within, reduction="sum") / len(right)
    if config.cost_weight:
        loss = loss + config.cost_weight * (logits.softmax(dim=1) @ (cost / cost.max())).mean()
    if config.regret_weight:
        regret = (psnrs[:, choices.widest].amax(dim=1, keepdim=True) - psnrs).clamp_min(0)
        loss = loss + config.regret_weight * (logits.softmax(dim=1) * regret).sum(dim=1).mean()
    return loss, labels


def train_gates(config: GateStage, choices: Choices, compute: Compute, log: JsonLog, started: float
                ) -> dict[float, Gate]:
    """One gate per delta of the sweep, trained together on the same online PSNRs of every sub-network
    (:func:`gate_loss`), each step on the new batch and then on ``config.replay`` batches of earlier steps."""
    torch.manual_seed(config.seed)
    deltas = sorted(set(config.delta_sweep) | ({config.delta_db} if config.delta_db != "auto" else set()))
    # With several profiles, the gate decides the profile with a head of its own (see model.gate.Gate).
    profiles = choices.profile_of.tolist() if len(choices.profiles) > 1 else []
    gate_config = GateConfig.from_dict({**config.gate, "num_subnets": len(choices.subnets), "profiles": profiles})
    gates = {delta: compute.module(Gate(gate_config)) for delta in deltas}
    optimizers = {delta: torch.optim.Adam(g.parameters(), lr=config.lr) for delta, g in gates.items()}
    kept: deque[tuple[torch.Tensor, torch.Tensor]] = deque(maxlen=REPLAY_KEPT)
    replay_rng = random.Random(config.seed)

    def update(delta: float, noisy: torch.Tensor, psnrs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = gates[delta](noisy)
        loss, labels = gate_loss(logits, psnrs, choices, delta, config)
        optimizers[delta].zero_grad(set_to_none=True)
        loss.backward()
        optimizers[delta].step()
        return loss, (logits.argmax(dim=1) == labels).float().mean(), labels

    def train_step(clean: torch.Tensor, noisy: torch.Tensor) -> dict:
        psnrs = subnet_psnrs(choices, noisy, clean)
        earlier = replay_rng.sample(list(kept), min(config.replay, len(kept))) if config.replay else []
        record = {}
        for delta in gates:
            loss, accuracy, labels = update(delta, noisy, psnrs)
            for old_noisy, old_psnrs in earlier:
                update(delta, old_noisy, old_psnrs)
            record[f"delta_{delta:g}"] = {
                "loss": round(loss.item(), 5),
                "accuracy": round(accuracy.item(), 4),
                "label_histogram": torch.bincount(labels, minlength=len(choices.subnets)).tolist(),
            }
        if config.replay:
            kept.append((noisy, psnrs))
        return record

    loop = Loop("gate", config.steps, train_step, list(optimizers.values()),
                lr=lambda at: cosine_lr(at, config.steps, config.lr), shape=lambda _: (config.crop, config.batch_size),
                log=log, log_every=config.log_every)
    run_loop(loop, Batches.for_run(config.data, config.seed, compute), started=started)
    return gates


def rounding_loss_db(choices: Choices, dtype: torch.dtype, pairs: list, table: torch.Tensor) -> float:
    """The most PSNR any sub-network loses, on the mean over the validation pairs, when its weights are
    rounded to ``dtype`` for storage (and computed in float32 again)."""
    if dtype == torch.float32:
        return 0.0
    rounded = {}
    for name, net in choices.nets.items():
        copy = SlimUNet(net.config).to(next(net.parameters()).device).eval()
        copy.load_state_dict({k: v.to(dtype).float() for k, v in net.state_dict().items()})
        rounded[name] = copy
    rounded_table, _ = _validation_table(Choices(rounded, choices.subnets), pairs)
    return round(max(0.0, float((table.mean(dim=0) - rounded_table.mean(dim=0)).max())), 5)


def train_gate(config: GateStage) -> Path:
    """Run stage 3 on the tailored checkpoint (and the profiles of ``config.profiles``).

    Writes, in ``out_dir``: ``ddsnet.safetensors`` (the gated checkpoint), ``config.yaml`` (the effective
    config), ``log.jsonl`` and ``report.json`` (every gate of the sweep on validation, and the one shipped).
    """
    check_settings(config)
    choices, history, sources = load_choices(config)  # refused before anything is written
    out_dir = Path(config.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_config(config, out_dir / CONFIG_FILE)
    data_sha256 = data_digests(config.data)
    compute = Compute(config.compute)
    for net in choices.nets.values():
        compute.module(net).requires_grad_(False)
    log = JsonLog(out_dir / "log.jsonl")
    started = time.time()
    gates = train_gates(config, choices, compute, log, started)

    pairs = validation_pairs(config.data, config.val_crop or None)
    table, noisies = _validation_table(choices, pairs)
    sigmas = [pair_label(key) for _, key, _, _ in pairs]
    scales = [f"{pair_scale(name):g}" for name, _, _, _ in pairs]
    sweep = [_report(gate, table, noisies, choices, delta, sigmas, scales) for delta, gate in gates.items()]
    shipped = choose_shipped(sweep, config.delta_db, config.auto_max_drop_db, config.auto_max_flops_fraction)
    rule = f"delta_db={config.delta_db}"
    if config.delta_db == "auto":
        rule += f", auto_max_drop_db={config.auto_max_drop_db}"
        if config.auto_max_flops_fraction is not None:
            rule += f", auto_max_flops_fraction={config.auto_max_flops_fraction}"
    dtype = SAVE_DTYPES[config.save_dtype]
    report = {"shipped": shipped, "shipped_rule": rule, "delta_sweep": sweep,
              "subnets": [s.to_dict() for s in choices.subnets],
              "rounding_loss_db": rounding_loss_db(choices, dtype, pairs, table)}
    (out_dir / REPORT_FILE).write_text(json.dumps(report, indent=2))
    log.write(report=shipped, seconds=round(time.time() - started, 1))

    record = stage_record(config, steps=config.steps, seconds=time.time() - started, data=data_sha256,
                          source_sha256=sources.pop("tailored"), delta_db=shipped["delta_db"],
                          val_accuracy=shipped["accuracy"], profiles=choices.profiles)
    if sources:
        record["profile_sources_tensors_sha256"] = sources
    written = provenance(history, "gate", record, config.recipe)
    path = out_dir / GATED_FILE
    save_checkpoint(path, choices.nets, gates[shipped["delta_db"]], choices.subnets, gate_trained=True,
                    provenance=written, dtype=dtype)
    return path
