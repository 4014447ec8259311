"""Run a process under a skewed wall clock: ``clockshift.c`` as an LD_PRELOAD library.

A worker whose clock is an hour behind (or ahead) of the database's must still behave;
these helpers make such a worker without touching the machine's clock::

    env = skewed_env(-3600)  # one hour behind
    worker = WorkerProcess(..., env={**other_env, **env}, ...)

Only wall-clock reads are shifted (``time.time()``, ``datetime.now()``, ``time()``,
``gettimeofday()``); ``time.monotonic()``, ``time.sleep()``, timed waits, ``select`` and
``poll`` run in real time, so a skewed process never hangs. File times (``os.stat``) and
other processes' clocks, such as the database's ``now()``, are not affected.

The library is compiled with ``gcc`` once per source version into a temporary directory
(Debian: package ``gcc``). Without ``gcc`` a test skips, or fails when ``CI=true``.
Timed waits stay correct only because Python 3.11+ on glibc 2.30+ waits on
CLOCK_MONOTONIC (``sem_clockwait``); an older Python waiting on an absolute
CLOCK_REALTIME deadline would wait the offset too.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from .services import skip_or_fail

SOURCE = Path(__file__).with_name("clockshift.c")
#: The environment variable the library reads its offset (seconds) from.
OFFSET_VARIABLE = "CLOCKSHIFT_SECONDS"


def build_shim() -> Path:
    """The compiled shim, built on first use and then reused while its source is unchanged.

    The file name carries a hash of the source, so an edited ``clockshift.c`` is rebuilt
    and processes still running the old one keep their copy.
    """
    gcc = shutil.which("gcc")
    if gcc is None:
        skip_or_fail("gcc is not installed, so the wall-clock skew shim cannot be built")
    source = SOURCE.read_bytes()
    digest = hashlib.sha256(source).hexdigest()[:16]
    # Per user, so that another account's directory is never trusted or overwritten.
    cache = Path(tempfile.gettempdir()) / f"celery-durable-clockshift-{os.getuid()}"
    cache.mkdir(mode=0o700, exist_ok=True)
    target = cache / f"clockshift-{digest}.so"
    if target.exists():
        return target
    # Compile to a private name and rename: a concurrent session never loads half a file.
    partial = cache / f".clockshift-{digest}-{os.getpid()}.so"
    result = subprocess.run(
        [gcc, "-shared", "-fPIC", "-O2", "-o", str(partial), str(SOURCE), "-ldl"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    if result.returncode != 0:
        partial.unlink(missing_ok=True)
        raise RuntimeError(f"gcc could not build {SOURCE}:\n{result.stderr}")
    partial.replace(target)
    return target


def skewed_env(seconds: float) -> dict[str, str]:
    """Environment additions that run a process with its wall clock ``seconds`` off.

    Negative values put the process behind real time. Any ``LD_PRELOAD`` already in
    ``os.environ`` is kept, after the shim.
    """
    preload = [str(build_shim())]
    if os.environ.get("LD_PRELOAD"):
        preload.append(os.environ["LD_PRELOAD"])
    return {"LD_PRELOAD": " ".join(preload), OFFSET_VARIABLE: repr(float(seconds))}
