"""Helpers shared by the benchmarks (and the tests): a served checkpoint on a free port, mutated uploads, the
command line, JSON reports."""

from __future__ import annotations

import argparse
import io
import json
import os
import random
import shlex
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path

import httpx
import numpy as np
from PIL import Image


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start_server(checkpoint: str, port: int, env: Mapping[str, str] | None = None,
                 extra_args: Sequence[str] = ()) -> subprocess.Popen:
    """Start ``python -m service.cli serve`` for ``checkpoint`` on 127.0.0.1:``port``; its output is discarded.

    Args:
        checkpoint: path of the checkpoint to serve.
        port: the port to listen on (see :func:`free_port`).
        env: variables set on top of this process's environment, e.g. ``{"DDSNET_MAX_BATCH_TILES": "1"}``.
        extra_args: more arguments for ``serve``.

    Returns:
        The server process; stop it with :func:`stop_server`.
    """
    command = [sys.executable, "-m", "service.cli", "serve", "--host", "127.0.0.1", "--port", str(port),
               "--checkpoint", str(checkpoint), *extra_args]
    return subprocess.Popen(command, env={**os.environ, **(env or {})}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)


def base_url(url_or_port: str | int) -> str:
    """``http://127.0.0.1:PORT`` for a port, or the URL itself without a trailing slash."""
    return f"http://127.0.0.1:{url_or_port}" if isinstance(url_or_port, int) else url_or_port.rstrip("/")


def wait_ready(url_or_port: str | int, timeout: float = 120, server: subprocess.Popen | None = None,
               path: str = "/readyz") -> None:
    """Poll ``path`` (ddsnet's ``/readyz`` unless told otherwise) until it answers 200.

    Args:
        url_or_port: the server's base URL, or its port on 127.0.0.1.
        path: the readiness endpoint (Prometheus: ``/-/ready``).
        timeout: seconds to wait in all.
        server: the server's process, if this process started it: its death ends the wait at once.

    Raises:
        RuntimeError: the server process exited (the message gives its exit status and command).
        TimeoutError: no 200 within ``timeout`` seconds.
    """
    url = f"{base_url(url_or_port)}{path}"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server is not None and server.poll() is not None:
            command = shlex.join(str(arg) for arg in server.args)
            raise RuntimeError(f"the server exited with status {server.returncode} before {url} answered 200; "
                               f"run `{command}` to see why")
        try:
            if httpx.get(url, timeout=5).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise TimeoutError(f"{url} did not answer 200 within {timeout:g} s")


def stop_server(server: subprocess.Popen, timeout: float = 30) -> None:
    """Terminate the server and wait for it; kill it if it does not stop within ``timeout`` seconds."""
    server.terminate()
    try:
        server.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        server.kill()
        server.wait()


@contextmanager
def running_server(checkpoint: str, env: Mapping[str, str] | None = None, extra_args: Sequence[str] = (),
                   timeout: float = 120) -> Iterator[str]:
    """Serve ``checkpoint`` on a free port for the ``with`` block; yields the base URL once it is ready."""
    port = free_port()
    server = start_server(checkpoint, port, env, extra_args)
    try:
        wait_ready(port, timeout, server)
        yield base_url(port)
    finally:
        stop_server(server)


def mutate(data: bytes, rng: random.Random) -> bytes:
    """One random corruption: flipped bytes, a cut, a spliced repeat, or an overwritten header field."""
    data = bytearray(data)
    kind = rng.randrange(4)
    if kind == 0:
        for _ in range(rng.randint(1, 8)):
            data[rng.randrange(len(data))] = rng.randrange(256)
    elif kind == 1:
        data = data[: rng.randrange(1, len(data))]
    elif kind == 2:
        start = rng.randrange(len(data))
        data[start:start] = data[start : start + rng.randint(1, 64)] * rng.randint(1, 4)
    else:
        position = rng.randrange(min(64, len(data)))
        data[position : position + 4] = struct.pack(">I", rng.choice([0, 1, 0xFFFF, 0xFFFFFFFF, 6000, 2**24]))
    return bytes(data)


def seed_files(side: int = 48) -> list[tuple[str, bytes]]:
    """Small valid files of every readable format, the starting points of the mutations."""
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (side, side + 8, 3), np.uint8))
    files = []
    for name, fmt, options in (("a.png", "PNG", {}), ("a.jpg", "JPEG", {}), ("a.webp", "WEBP", {"lossless": True}),
                               ("b.webp", "WEBP", {}), ("a.tif", "TIFF", {}), ("a.bmp", "BMP", {})):
        buffer = io.BytesIO()
        image.save(buffer, fmt, **options)
        files.append((name, buffer.getvalue()))
    return files


def program() -> list[str]:
    """The running benchmark as typed from the repository root, e.g. ``["python", "-m", "benchmarks.serve"]``."""
    spec = getattr(sys.modules["__main__"], "__spec__", None)
    return ["python", "-m", spec.name] if spec is not None else ["python", sys.argv[0]]


def command_line() -> str:
    """The running benchmark's whole command line, for reports, e.g. ``python -m benchmarks.serve --requests 8``."""
    return shlex.join([*program(), *sys.argv[1:]])


def argument_parser(description: str | None) -> argparse.ArgumentParser:
    """A parser whose help shows the ``python -m benchmarks.NAME`` usage and the module docstring as written."""
    return argparse.ArgumentParser(prog=shlex.join(program()), description=description,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)


def print_targets(checks: dict, prefix: str = "") -> None:
    """Print each target as ``target NAME: VALUE vs BAR: met|missed`` (``checks``: name -> value, bar, met)."""
    for name, check in checks.items():
        print(f"target {prefix}{name}: {check['value']} vs {check['bar']}: {'met' if check['met'] else 'missed'}")


def write_report(path: str | Path, report: dict) -> Path:
    """Write ``report`` as indented JSON (parent folders created) and print ``wrote PATH``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {path}")
    return path
