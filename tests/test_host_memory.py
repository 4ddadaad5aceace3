"""A CPU fit keeps freed step buffers in the process: the next step reuses their pages."""

from __future__ import annotations

import subprocess
import sys

import pytest

# In a fresh interpreter: a long-lived test process has other threads whose page faults
# getrusage counts too.
REUSE = """
import resource, torch
from alfusion.engine.host_memory import keep_freed_buffers
assert keep_freed_buffers() and keep_freed_buffers()  # takes effect; once is enough
torch.ones(400, 24, 384).sum()  # a 15 MB batch, allocated, written and freed
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(5):
    torch.ones(400, 24, 384).sum()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc only")
def test_a_freed_step_sized_buffer_is_reused_without_page_faults():
    out = subprocess.run([sys.executable, "-c", REUSE], capture_output=True, text=True,
                         check=True)
    # Fresh pages would fault 3,600 times per buffer (4 KiB pages): 18,000 in all.
    assert int(out.stdout.split()[-1]) < 500
