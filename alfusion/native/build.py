"""Building the native kernels: each C file beside this module is compiled on first use with
the machine's C compiler and loaded with ctypes.

A build is cached under ``$ALFUSION_CACHE/native`` (default ``~/.cache/alfusion/native``), in a
folder named by a hash of the source and the headers beside it, the compiler, its flags and
the CPU (the code is built for this CPU: ``-march=native``), written under a temporary name
and renamed when complete, so concurrent first runs never load a partial library. Where no
compiler works, ``load`` returns None and callers keep their torch path (slower;
native/__init__.py says what differs); ``ALFUSION_NATIVE=0`` asks for the torch path
everywhere.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from alfusion.user_cache import user_cache_dir

log = logging.getLogger(__name__)

# OpenMP: the library shares torch's runtime (libgomp.so.1, loaded with torch), so its threads
# are torch's. -ffast-math lets the compiler call the vector log, cos and exp of glibc's libmvec.
# Compiled and linked in two steps: linked with -ffast-math, the library would carry a
# constructor that flushes denormals to zero in the thread that loads it, changing torch's
# arithmetic there.
COMPILE = ("-O3", "-march=native", "-ffast-math", "-fopenmp", "-fPIC", "-c")
LINK = ("-shared", "-fopenmp") + (("-lmvec", "-lm") if sys.platform.startswith("linux")
                                  else ("-lm",))


def _cpu() -> str:
    """What -march=native builds for: the CPU's model and feature flags."""
    try:
        info = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.processor() or platform.machine()
    keep = [line for line in info if line.startswith(("model name", "flags", "Features"))]
    return "\n".join(dict.fromkeys(keep))


def _compiler() -> str | None:
    return next((c for c in (os.environ.get("CC"), "cc", "gcc", "clang") if c and shutil.which(c)),
                None)


@functools.cache
def _toolchain(compiler: str) -> str:
    """What a build depends on besides its source: the compiler, its version, the flags, the
    CPU (read once per process)."""
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True).stdout
    return "\n".join([compiler, version, *COMPILE, *LINK, _cpu()])


def _build(source: Path, compiler: str) -> Path:
    """The cached shared library of ``source``, compiled when absent."""
    headers = sorted(source.parent.glob("*.h"))  # what the sources include
    key = "\n".join([source.read_text(), *(h.read_text() for h in headers),
                     _toolchain(compiler)])
    folder = user_cache_dir() / "native" / hashlib.sha256(key.encode()).hexdigest()[:16]
    target = folder / f"{source.stem}.so"
    if target.exists():
        return target
    folder.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=folder)
    os.close(fd)
    objects = tmp + ".o"
    try:
        for command in ([compiler, *COMPILE, str(source), "-o", objects],
                        [compiler, objects, "-o", tmp, *LINK]):
            done = subprocess.run(command, capture_output=True, text=True)
            if done.returncode != 0:
                raise OSError(done.stderr.strip() or f"{command[0]} exited with {done.returncode}")
        os.replace(tmp, target)
    finally:
        for path in (tmp, objects):
            if os.path.exists(path):
                os.unlink(path)
    return target


@functools.cache
def load(name: str) -> ctypes.CDLL | None:
    """The library of ``<name>.c`` in this folder, or None (no compiler, a failed build,
    or ALFUSION_NATIVE=0): the caller's torch path then takes over."""
    if os.environ.get("ALFUSION_NATIVE", "1") == "0":
        return None
    compiler = _compiler()
    if compiler is None:
        log.info("no C compiler found (set CC): native %s kernels off, torch computes them", name)
        return None
    try:
        return ctypes.CDLL(str(_build(Path(__file__).with_name(f"{name}.c"), compiler)))
    except OSError as error:
        log.warning("native %s kernels off (torch computes them): %s", name, error)
        return None
