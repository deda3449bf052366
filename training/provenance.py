"""A checkpoint's provenance: flat, bounded, and free of local paths.

Every stage writes one record and keeps the records of the stages before it, so a gated checkpoint holds
at most four (``profile`` where it has a second set of weights), whatever chain of runs made it::

    {"recipe": "ddsnet-color",
     "versions": {"ddsnet": "0.1.0", "torch": "2.13.0", "python": "3.11.2"},
     "stages": {"supernet": {...}, "tailor": {...}, "gate": {...}}}

A stage record holds the stage's effective config without its paths, what it ran (``steps``), how long it
took (``seconds``), the SHA-256 of the photos it read (:func:`data_digest`: names and bytes, so a folder
moved elsewhere hashes the same) and the tensor digest of the checkpoint it started from. A later run of a
stage replaces that stage's record.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import platform
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from model import package_version
from model.checkpoint import METADATA_KEY, read_metadata
from training.data import list_images

STAGES = ("supernet", "tailor", "profile", "gate")
# Config keys that name files or folders on the machine that ran the stage; provenance leaves them out.
PATH_KEYS = frozenset({"out_dir", "init_from", "supernet", "tailored", "train_dir", "val_dir", "profiles"})


def data_digest(folder: str | Path) -> str:
    """SHA-256 over the sorted names and contents of the images in ``folder`` (see :func:`list_images`)."""
    digest = hashlib.sha256()
    for path in list_images(folder):
        digest.update(path.name.encode() + b"\0")
        digest.update(hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()


def versions() -> dict[str, str]:
    """The versions that shape a trained checkpoint: ddsnet, torch and Python."""
    return {"ddsnet": package_version(), "torch": torch.__version__.split("+")[0], "python": platform.python_version()}


def machine() -> dict:
    """The machine a measurement ran on: platform, processor, torch and its intra-op threads."""
    return {"platform": platform.platform(), "processor": platform.processor(), "torch": torch.__version__,
            "threads": torch.get_num_threads()}


def config_without_paths(config: Any) -> dict:
    """A stage config (dataclass or dict) as JSON-able data, with every key of :data:`PATH_KEYS` removed."""
    raw = dataclasses.asdict(config) if dataclasses.is_dataclass(config) else config

    def strip(node: Any) -> Any:
        if isinstance(node, dict):
            return {key: strip(value) for key, value in node.items() if key not in PATH_KEYS}
        if isinstance(node, list | tuple):
            return [strip(value) for value in node]
        return node

    return json.loads(json.dumps(strip(raw)))


def data_digests(data: Any, train: bool = True) -> dict[str, str]:
    """The :func:`data_digest` of a stage's validation folder and, if it reads them, its training photos."""
    digests = {"train_sha256": data_digest(data.train_dir)} if train else {}
    return digests | {"val_sha256": data_digest(data.val_dir)}


def stage_record(config: Any, *, steps: int, seconds: float, data: dict[str, str], source_sha256: str = "",
                 **extra: Any) -> dict:
    """One stage's record.

    Args:
        config: the stage's effective config (a dataclass); recorded without paths.
        steps: optimisation steps the run made (for a resumed run, all of them).
        seconds: wall-clock seconds of the run.
        data: :func:`data_digests` of the photos it read.
        source_sha256: the ``tensors_sha256`` of the checkpoint it started from, if any: which weights, without
            naming the file.
        extra: stage-specific results, e.g. the gate's chosen ``delta_db``.
    """
    record = {"config": config_without_paths(config), "steps": int(steps), "seconds": round(float(seconds), 1),
              **data}
    if source_sha256:
        record["source_tensors_sha256"] = source_sha256
    return record | extra


def provenance(previous: dict | None, stage: str, record: dict, recipe: str = "") -> dict:
    """The provenance of a checkpoint that ``stage`` writes, from the one it started from.

    The earlier stages' records are kept; ``stage``'s own and any later stage's are replaced or dropped
    (a supernet trained again invalidates its old tailoring and gate). A provenance in any other shape
    (an older nested one) contributes nothing.
    """
    if stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r}; expected one of {', '.join(STAGES)}")
    earlier = STAGES[: STAGES.index(stage)]
    kept = (previous or {}).get("stages", {})
    stages = {name: kept[name] for name in earlier if isinstance(kept, dict) and name in kept}
    stages[stage] = record
    previous_recipe = (previous or {}).get("recipe", "") if stages.keys() - {stage} else ""
    return {"recipe": recipe or previous_recipe, "versions": versions(), "stages": stages}


def with_last_stage_of(previous: dict | None, other: dict | None) -> dict | None:
    """``previous`` with the record of ``other``'s last stage (the stage that made that checkpoint) in place of
    its own record of that stage, its other stages kept: the provenance of a checkpoint that takes one
    profile's weights from ``other`` and the rest from ``previous``."""
    theirs = (other or {}).get("stages")
    made = [name for name in STAGES if name in theirs] if isinstance(theirs, dict) else []
    if not made:
        return previous
    kept = (previous or {}).get("stages", {})
    stages = dict(kept) if isinstance(kept, dict) else {}
    stages[made[-1]] = theirs[made[-1]]
    return {**(previous or {}), "stages": {name: stages[name] for name in STAGES if name in stages}}


def resave_with_provenance(source: str | Path, target: str | Path, new_provenance: dict) -> None:
    """Write ``source`` to ``target`` with its provenance replaced, tensors and digest unchanged byte for byte.

    ``source`` must be a ddsnet checkpoint (checked, see :func:`read_metadata`); ``target`` may equal it.
    """
    document = read_metadata(source)
    with safe_open(str(source), framework="pt") as handle:
        tensors = {name: handle.get_tensor(name) for name in handle.keys()}
    document["provenance"] = new_provenance
    target = Path(target)
    partial = target.with_name(target.name + ".partial")
    save_file(tensors, str(partial), metadata={METADATA_KEY: json.dumps(document)})
    partial.chmod(0o644)
    partial.replace(target)
