"""The engine cache: built engines and their measured speeds, kept on disk for the next process.

Building and timing every candidate engine of a sub-network costs seconds, and a process that throws that
work away pays it again: a CLI call for one photo, a restarted container. The cache keeps, per machine and
checkpoint:

* the artefacts that make an engine fast to load: the OpenVINO model (IR) and OpenVINO's compiled-model
  cache (``CACHE_DIR``), the exported ONNX file;
* measurements: per sub-network and engine, the seconds it took to build and to load, and the seconds per
  window pixel it runs at. ``auto`` chooses from these without timing anything again.

Layout: ``<root>/<key digest>/`` holds ``key.json`` (what the digest covers), one folder per engine and
version (``openvino-2025.1.0/``, ...) and the measurements, one file per run-time condition that changes the
speeds but not the engines (``measurements-allocator-keep.json``: the allocator setting, see
``model.allocator``). The key covers the checkpoint's tensor digest, the CPU model, the thread count and the
window bound (batch, size multiple, largest side); a folder's name covers the engine's version. When any of
them changes, the digest or the folder changes, and the engine is built again: the cache never serves an
engine built for something else. A process under another condition loads the same engines and measures their
speeds afresh.

Every write goes to a temporary name first and is then renamed into place, and the measurements are
updated under a file lock, so processes that start together on an empty cache are safe. An entry that
cannot be read is rebuilt, with a warning.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import importlib.metadata
import json
import logging
import os
import platform
import shutil
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("ddsnet.cache")

FORMAT = 2  # of the layout; a new layout gets a new digest
KEY_FILE = "key.json"
MEASUREMENTS_PREFIX = "measurements"
LOCK_FILE = ".lock"
DISTRIBUTIONS = {"torch": "torch", "onnxruntime": "onnxruntime", "openvino": "openvino"}


def default_root() -> Path:
    """``$XDG_CACHE_HOME/ddsnet``, or ``~/.cache/ddsnet``."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "ddsnet"


@functools.cache
def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``), else what ``platform`` knows."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


@functools.cache
def engine_version(backend: str) -> str:
    """The installed version of ``backend``'s runtime (read once: every measurement and folder names it)."""
    try:
        return importlib.metadata.version(DISTRIBUTIONS[backend])
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


@dataclass(frozen=True)
class Measurement:
    """One engine on one sub-network: seconds to build it from the checkpoint (``None`` where the processes under
    this entry's conditions only loaded it, see :class:`EngineCache`), seconds to load it from the cache
    (``None`` until it has been), and seconds per window pixel at run time."""

    build_s: float | None
    seconds_per_pixel: float
    load_s: float | None = None

    def to_dict(self) -> dict:
        return {"build_s": self.build_s, "load_s": self.load_s, "seconds_per_pixel": self.seconds_per_pixel}


class EngineCache:
    """One cache entry: the folder for a (checkpoint, CPU, threads, window bound) key under ``root``.

    Args:
        root: the cache's folder (created on first write).
        key: what the engines depend on besides the engine's version; any JSON-able mapping.
        measured_under: what the measured speeds depend on besides the key, as name -> value (the allocator
            setting): it names the measurements' file, and the engines are shared.
    """

    def __init__(self, root: str | Path, key: dict, measured_under: dict[str, str] | None = None) -> None:
        self.root = Path(root)
        self.key = {"format": FORMAT, **key}
        digest = hashlib.sha256(json.dumps(self.key, sort_keys=True).encode()).hexdigest()[:16]
        self.folder = self.root / digest
        self.measured_under = dict(measured_under or {})
        if any(not str(part).isalnum() for item in self.measured_under.items() for part in item):
            raise ValueError(f"measured_under names and values must be letters and digits: {self.measured_under}")
        conditions = (f"{name}-{value}" for name, value in sorted(self.measured_under.items()))
        self.measurements_file = "-".join([MEASUREMENTS_PREFIX, *conditions]) + ".json"
        self.rebuilt = 0  # entries that could not be read and were built again, in this process

    def engine_folder(self, backend: str) -> Path:
        return self.folder / f"{backend}-{engine_version(backend)}"

    def artefact(self, backend: str, name: str) -> Path | None:
        """The path of a stored artefact, or ``None`` when there is none."""
        path = self.engine_folder(backend) / name
        return path if path.exists() else None

    def store(self, backend: str, name: str, write: Callable[[Path], None]) -> Path:
        """Store an artefact made by ``write(temporary path)``: a file or a folder, renamed into place. If
        another process stored it first, its copy is kept and ours dropped."""
        folder = self._prepare(self.engine_folder(backend))
        target = folder / name
        scratch = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=folder))
        try:
            made = scratch / name
            write(made)
            with contextlib.suppress(OSError):  # an existing target: the other process's copy stays
                os.rename(made, target)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        return target

    def discard(self, backend: str, name: str, why: str) -> None:
        """Drop an artefact that could not be used, so that it is built again."""
        log.warning("engine cache: %s in %s is unusable (%s); building it again", name,
                    self.engine_folder(backend), why)
        self.rebuilt += 1
        path = self.engine_folder(backend) / name
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)

    def measurements(self) -> dict[int, dict[str, Measurement]]:
        """Sub-network index -> engine -> what was measured, for the engine versions installed now."""
        raw = self._read_measurements()
        found: dict[int, dict[str, Measurement]] = {}
        for subnet, engines in raw.items():
            for backend, record in engines.items():
                if backend in DISTRIBUTIONS and record.get("version") == engine_version(backend):
                    with contextlib.suppress(KeyError, TypeError, ValueError):
                        found.setdefault(int(subnet), {})[backend] = Measurement(
                            _seconds(record.get("build_s")), float(record["seconds_per_pixel"]),
                            _seconds(record.get("load_s")))
        return found

    def record(self, subnet: int, backend: str, build_s: float | None = None, load_s: float | None = None,
               seconds_per_pixel: float | None = None) -> None:
        """Merge what was measured of ``backend`` on ``subnet`` into the measurements' file (under the lock;
        the values not given keep what was there). A cache that cannot be written (read-only, full) costs the
        next process a measurement, nothing more: it is logged, not raised."""
        try:
            self._prepare(self.folder)
            with self._locked():
                raw = self._read_measurements()
                entry = raw.setdefault(str(subnet), {}).get(backend, {})
                if entry.get("version") != engine_version(backend):
                    entry = {"version": engine_version(backend)}
                for name, value in (("build_s", build_s), ("load_s", load_s),
                                    ("seconds_per_pixel", seconds_per_pixel)):
                    if value is not None:
                        entry[name] = round(float(value), 9)
                raw[str(subnet)][backend] = entry
                self._write_json(self.folder / self.measurements_file, raw)
        except OSError as error:
            log.warning("engine cache: could not record %s on sub-network %d in %s: %s", backend, subnet,
                        self.folder, error)

    def _read_measurements(self) -> dict:
        path = self.folder / self.measurements_file
        try:
            raw = json.loads(path.read_text())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as error:
            log.warning("engine cache: %s is unreadable (%s); measuring again", path, error)
            return {}
        if not isinstance(raw, dict) or not all(isinstance(v, dict) for v in raw.values()):
            log.warning("engine cache: %s is not a table of measurements; measuring again", path)
            return {}
        return raw

    def _prepare(self, folder: Path) -> Path:
        folder.mkdir(parents=True, exist_ok=True)
        key_path = self.folder / KEY_FILE
        if not key_path.exists():
            self._write_json(key_path, self.key)
        return folder

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        with open(self.folder / LOCK_FILE, "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    @staticmethod
    def _write_json(path: Path, value: object) -> None:
        handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
        with os.fdopen(handle, "w") as stream:
            json.dump(value, stream, indent=1, sort_keys=True)
        os.replace(temporary, path)


def _seconds(value: object) -> float | None:
    return None if value is None else float(value)


def entries(root: str | Path) -> list[dict]:
    """What ``ddsnet cache info`` shows: per entry its folder, key, engines, the conditions it holds measurements
    under (``allocator-keep``, ...) and size in bytes."""
    found = []
    root = Path(root)
    if not root.is_dir():
        return found
    for folder in sorted(p for p in root.iterdir() if p.is_dir()):
        try:
            key = json.loads((folder / KEY_FILE).read_text())
        except (OSError, ValueError):
            key = None
        size = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
        engines = sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
        measured = sorted(p.stem.removeprefix(MEASUREMENTS_PREFIX).lstrip("-") or "-"
                          for p in folder.glob(f"{MEASUREMENTS_PREFIX}*.json"))
        stale = not isinstance(key, dict) or key.get("format") != FORMAT  # an older layout: never read again
        found.append({"folder": str(folder), "key": key, "engines": engines, "measured_under": measured,
                      "stale": stale, "bytes": size})
    return found


def clear(root: str | Path) -> int:
    """Remove every entry under ``root``; returns how many there were."""
    root = Path(root)
    if not root.is_dir():
        return 0
    count = 0
    for folder in root.iterdir():
        if folder.is_dir():
            shutil.rmtree(folder, ignore_errors=True)
            count += 1
    return count
