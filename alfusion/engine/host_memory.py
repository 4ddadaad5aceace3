"""Host memory for training on the CPU: freed step buffers stay in the process for reuse.

A training step allocates and frees the same large tensors every step (a batch of
400 x 24 x 384 fp32 tokens is 15 MB). glibc serves blocks of that size with fresh ``mmap``
pages by default and returns them on free, so every step faults its activations in again: some
4,000-10,000 page faults, a tenth to a fifth of a CPU step (docs/benchmarks.md). This changes
malloc for the whole process (a Python session that fits a probe too). Raising
glibc's mmap threshold to its maximum (32 MB) and its trim threshold keeps those blocks in the
heap, where the next step finds them. Blocks above 32 MB are mapped and returned as before, and
at most 256 MB of free heap top is kept. Elsewhere than glibc (macOS, musl) nothing changes.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import sys

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters (malloc.h)
MMAP_THRESHOLD = 32 << 20  # glibc's largest
TRIM_THRESHOLD = 256 << 20


@functools.cache
def keep_freed_buffers() -> bool:
    """Tune glibc's malloc as above, once per process; True where it took effect."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallopt
    except (OSError, AttributeError):  # no libc by that name, or not glibc
        return False
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) \
        and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
