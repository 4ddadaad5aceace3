"""A CPU fit keeps freed step buffers in the process: the next step reuses their pages."""

from __future__ import annotations

import resource
import sys

import pytest
import torch

from alfusion.engine.host_memory import keep_freed_buffers


def faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc only")
def test_a_freed_step_sized_buffer_is_reused_without_page_faults():
    assert keep_freed_buffers() and keep_freed_buffers()  # takes effect; once is enough
    torch.ones(400, 24, 384).sum()  # a 15 MB batch, allocated, written and freed
    before = faults()
    for _ in range(5):
        torch.ones(400, 24, 384).sum()
    # Fresh pages would fault 3,600 times per buffer (4 KiB pages).
    assert faults() - before < 500
