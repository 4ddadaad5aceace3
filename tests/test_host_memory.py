"""A CPU fit keeps freed step buffers in the process: the next step reuses their pages."""

from __future__ import annotations

import subprocess
import sys

import pytest

# Five steps' worth of page faults in a fresh interpreter (a long-lived test process has other
# threads whose faults getrusage counts too), with or without the fit's malloc tuning.
STEPS = """
import resource, sys, torch
from alfusion.engine.host_memory import keep_freed_buffers
if sys.argv[1] == "tuned":
    assert keep_freed_buffers() and keep_freed_buffers()  # takes effect; once is enough
def step():  # three 15 MB batch-sized tensors alive at once, then freed, as in a step
    a = torch.ones(400, 24, 384)
    b = a * 2
    return float((a + b).sum())
for _ in range(3):
    step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(5):
    step()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def page_faults(mode: str) -> int:
    out = subprocess.run([sys.executable, "-c", STEPS, mode], capture_output=True, text=True,
                         check=True)
    return int(out.stdout.split()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc only")
def test_freed_step_buffers_are_reused_instead_of_faulted_in_again():
    """glibc by default returns the three freed buffers to the system and faults them in
    again the next step (3,600 faults a buffer: some 54,000 in five steps); tuned, the steps
    reuse them (the kernel may still reclaim an idle page now and then)."""
    assert page_faults("tuned") <= page_faults("default") / 2
