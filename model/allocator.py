"""How the C allocator serves PyTorch's CPU tensors.

glibc's ``malloc`` gives every request above its mmap threshold (at most 32 MB) pages of its own, mapped when the
tensor is made and unmapped when it is freed. A denoising network makes and frees feature maps of tens to
hundreds of MB at every layer, so each layer faults its output's pages in afresh: on 2 cores a 1232x1232
window of the slimmest sub-network spends about as much time in the kernel, zeroing pages, as in the
convolutions. With :func:`tune_allocator` ("keep") the process takes large blocks from its heap, keeps what it
frees for the next layer, and lets every thread share that heap. Its resident memory then stays at the
largest job's peak until :func:`release_free_memory` hands the free pages back (the service does when its
queue drains).

Only glibc has these settings; elsewhere :func:`tune_allocator` does nothing and says so.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import platform

log = logging.getLogger("ddsnet.allocator")

# mallopt(3) parameters.
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
M_ARENA_MAX = -8

# "keep": large blocks from the heap, freed memory kept, one heap for every thread; "system": glibc's defaults.
ALLOCATOR_MODES = ("keep", "system")

_SETTINGS = ((M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, -1), (M_ARENA_MAX, 1))
_keeps = False
_LIBC_PATH = ctypes.util.find_library("c")
_LIBC = ctypes.CDLL(_LIBC_PATH) if _LIBC_PATH else None


def allocator_keeps() -> bool:
    """Whether :func:`tune_allocator` has set this process to keep freed memory."""
    return _keeps


def tune_allocator(mode: str = "keep") -> bool:
    """Set the process's allocator for large tensors (see the module's docstring); call it early, before the
    process starts threads or runs a network.

    Args:
        mode: ``"keep"``, or ``"system"`` to leave glibc's defaults.

    Returns:
        Whether the allocator now keeps freed memory: ``False`` where the C library is not glibc, and for
        ``"system"`` unless an earlier call has set it (settings last as long as the process).

    Raises:
        ValueError: ``mode`` is not one of :data:`ALLOCATOR_MODES`.
    """
    global _keeps
    if mode not in ALLOCATOR_MODES:
        raise ValueError(f"DDSNET_ALLOCATOR must be one of {', '.join(ALLOCATOR_MODES)}, not {mode!r}")
    if mode == "system":
        return _keeps
    if _LIBC is None or platform.libc_ver()[0] != "glibc":
        log.warning("allocator: the C library is not glibc; its defaults stay")
        return False
    _keeps = all([_LIBC.mallopt(parameter, value) == 1 for parameter, value in _SETTINGS])  # every one tried
    if not _keeps:
        log.warning("allocator: glibc refused a mallopt setting; large tensors may still be mapped afresh")
    return _keeps


def release_free_memory() -> None:
    """Return the C heap's free pages to the OS (glibc's ``malloc_trim``), so that a burst of large images
    does not leave the process at its peak size; a no-op without glibc."""
    trim = getattr(_LIBC, "malloc_trim", None)
    if trim is not None:
        trim(0)


__all__ = ["ALLOCATOR_MODES", "allocator_keeps", "release_free_memory", "tune_allocator"]
