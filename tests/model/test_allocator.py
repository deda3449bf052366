"""The allocator setting (model/allocator.py), in fresh processes: it changes the whole process for good."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

from model.allocator import tune_allocator

# Makes and frees a 64 MB tensor (above glibc's largest mmap threshold) in a worker thread, as the service's
# scheduler does, then counts the page faults of making it again: the fewest of three rounds.
PROBE = """
import resource, sys, threading
from model.allocator import tune_allocator
print(tune_allocator(sys.argv[1]))
import torch

def layer():
    torch.ones(16 * 1024 * 1024).sum()

def faults():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    worker = threading.Thread(target=layer)
    worker.start()
    worker.join()
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

faults()
print(min(faults() for _ in range(3)))
"""

PAGES_OF_64_MB = 64 * 1024 * 1024 // 4096
ROOT = Path(__file__).resolve().parents[2]


def _huge_pages_always() -> bool:
    """Transparent huge pages for every mapping: a large mmap then faults in 2 MB at a time, not 4 KB."""
    setting = Path("/sys/kernel/mm/transparent_hugepage/enabled")
    return setting.exists() and "[always]" in setting.read_text()


def _second_round_faults(mode: str) -> tuple[str, int]:
    result = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True,
                            cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    kept, faults = result.stdout.split()
    return kept, int(faults)


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="the settings are glibc's")
def test_kept_memory_spares_the_page_faults_of_a_tensor_made_again():
    kept, faults = _second_round_faults("keep")
    assert kept == "True"
    assert faults < PAGES_OF_64_MB // 10
    kept, faults = _second_round_faults("system")
    assert kept == "False"
    if not _huge_pages_always():
        assert faults >= PAGES_OF_64_MB * 9 // 10  # glibc's default: mapped afresh, every page faulted in again


def test_an_unknown_allocator_mode_is_refused():
    with pytest.raises(ValueError, match="DDSNET_ALLOCATOR must be one of keep, system"):
        tune_allocator("jemalloc")
