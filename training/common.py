"""Pieces the stages share: JSON-lines logs, evaluation on fixed validation pairs, and the resumable training
state (weights, Adam moments, noise RNG) of stage 1 and stage 2's fine-tune."""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from model.metrics import psnr
from model.supernet import SlimUNet, WidthConfig
from model.tiling import denoise_whole
from training.data import PatchSampler, pair_label


class JsonLog:
    """Appends one JSON object per line; every record gets wall-clock ``time``.

    ``enabled=False`` writes nothing: the log of a data-parallel run's other processes, whose records rank 0
    writes.
    """

    def __init__(self, path: str | Path, enabled: bool = True) -> None:
        self.path, self.enabled = Path(path), enabled
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def write(self, **record: object) -> None:
        if not self.enabled:
            return
        record = {"time": round(time.time(), 3), **record}
        with self.path.open("a") as handle:
            handle.write(json.dumps(record) + "\n")


@torch.inference_mode()
def psnr_by_sigma(net: SlimUNet, widths: WidthConfig, pairs: list) -> dict[str, float]:
    """Mean PSNR per noise of ``net`` at ``widths`` on fixed pairs (see ``fixed_noisy_set``); the keys are
    labels: ``"25"`` for AWGN at sigma 25, else a degradation's name."""
    sums: dict[str, list[float]] = {}
    device = next(net.parameters()).device
    for _, sigma, clean, noisy in pairs:
        value = psnr(denoise_whole(net, noisy.to(device), widths), clean.to(device)).item()
        sums.setdefault(pair_label(sigma), []).append(value)
    return {key: round(sum(values) / len(values), 4) for key, values in sums.items()}


def save_train_state(path: Path, modules: dict[str, torch.nn.Module], optimizer: torch.optim.Adam,
                     generator: torch.Generator, sampler: PatchSampler, meta: dict) -> None:
    """Write everything a ``--resume`` needs, in safetensors (no pickle), atomically.

    Each module's tensors go under ``"<name>."``, the Adam moments of the optimizer's parameters (in order)
    under ``"adam.<index>."``, the noise generator's state as ``noise_generator``; ``meta`` (JSON-able:
    step, elapsed time, ...) goes into the file's metadata with the Adam step counts and the crop
    sampler's RNG state.
    """
    tensors = {f"{name}.{k}": v.detach().cpu().contiguous() for name, module in modules.items()
               for k, v in module.state_dict().items()}
    adam_steps = {}
    for index, param in enumerate(_params(optimizer)):
        state = optimizer.state.get(param)
        if state:
            tensors[f"adam.{index}.exp_avg"] = state["exp_avg"].cpu().contiguous()
            tensors[f"adam.{index}.exp_avg_sq"] = state["exp_avg_sq"].cpu().contiguous()
            adam_steps[index] = float(state["step"])
    tensors["noise_generator"] = generator.get_state()
    partial = path.with_name(path.name + ".partial")
    save_file(tensors, str(partial), metadata={"resume": json.dumps({**meta, "adam_steps": adam_steps,
                                                                         "sampler_rng": sampler.state()})})
    partial.replace(path)


def read_state_meta(path: Path) -> dict:
    """The metadata of a state written by ``save_train_state``, without loading its tensors."""
    if not path.is_file():
        raise FileNotFoundError(f"--resume: no {path} to resume from")
    with safe_open(str(path), framework="pt") as handle:
        return json.loads(handle.metadata()["resume"])


def load_train_state(path: Path, modules: dict[str, torch.nn.Module], optimizer: torch.optim.Adam,
                     generator: torch.Generator, sampler: PatchSampler) -> dict:
    """Restore what ``save_train_state`` wrote into ``modules``, ``optimizer``, ``generator`` and ``sampler``;
    returns meta."""
    meta = read_state_meta(path)
    with safe_open(str(path), framework="pt") as handle:
        tensors = {k: handle.get_tensor(k) for k in handle.keys()}
    for name, module in modules.items():
        module.load_state_dict({k[len(name) + 1:]: v for k, v in tensors.items() if k.startswith(f"{name}.")})
    for index, param in enumerate(_params(optimizer)):
        if f"adam.{index}.exp_avg" in tensors:
            optimizer.state[param] = {
                "step": torch.tensor(meta["adam_steps"][str(index)]),
                "exp_avg": tensors[f"adam.{index}.exp_avg"].to(param.device),
                "exp_avg_sq": tensors[f"adam.{index}.exp_avg_sq"].to(param.device),
            }
    generator.set_state(tensors["noise_generator"])
    sampler.set_state(rng_state(meta["sampler_rng"]))
    return meta


def _params(optimizer: torch.optim.Optimizer) -> list[torch.nn.Parameter]:
    return [param for group in optimizer.param_groups for param in group["params"]]


def rng_state(state: list) -> tuple:
    """A ``random.Random`` state back from its JSON form (tuples became lists)."""
    return (state[0], tuple(state[1]), state[2])
