"""A CPU fit keeps freed step buffers in the process: the next step reuses their pages."""

from __future__ import annotations

import subprocess
import sys

import pytest

# In a fresh interpreter (glibc's dynamic thresholds depend on what was freed before): a
# batch-sized tensor (400 x 24 x 384 fp32, 15 MB) made and freed, with or without the fit's
# malloc tuning; glibc's own account (mallinfo2) of where it lived and what it kept.
BUFFER = """
import ctypes, sys, torch
from alfusion.engine.host_memory import keep_freed_buffers

class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
        "fordblks", "keepcost")]

info = ctypes.CDLL("libc.so.6").mallinfo2
info.restype = MallInfo2
if sys.argv[1] == "tuned":
    assert keep_freed_buffers() and keep_freed_buffers()  # takes effect; once is enough
before = info().hblkhd  # bytes in blocks of their own mmap, returned on free
a = torch.ones(400, 24, 384)
mapped = info().hblkhd - before
del a
print(mapped, info().fordblks)  # the free bytes the heap keeps
"""
MB = 1 << 20
BYTES = 400 * 24 * 384 * 4  # the buffer


def buffer_life(mode: str) -> tuple[int, int]:
    """(bytes the buffer added to blocks mapped on their own, free heap bytes kept after
    it was freed)."""
    out = subprocess.run([sys.executable, "-c", BUFFER, mode], capture_output=True, text=True,
                         check=True)
    mapped, kept = out.stdout.split()[-2:]
    return int(mapped), int(kept)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc only")
def test_freed_step_buffers_stay_in_the_heap_for_the_next_step():
    """By default glibc maps a 15 MB block on its own and unmaps it on free, so the next step
    faults its pages in again (some 3,600 faults a buffer, docs/benchmarks.md); tuned, the
    block comes from the heap and stays there when freed."""
    mapped, kept = buffer_life("default")
    assert mapped >= BYTES and kept < BYTES
    mapped, kept = buffer_life("tuned")
    assert mapped < MB and kept >= BYTES
