"""Process-wide tuning for running the model on a CPU: how idle OpenMP threads wait, and whether the C heap keeps
freed memory. The command line applies it (as a launcher would) when the model runs on the CPU; importing maecli or
calling its Python API never does. Anything the user set in the environment wins.

No torch here: the OpenMP setting must be in the environment before torch loads.
"""

from __future__ import annotations

import glob
import os
import sys

MALLOC_SETTINGS = ("MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_MAX_", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TOP_PAD_")
M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4  # mallopt parameter numbers, from glibc's malloc.h
KEEP_FREE_BYTES = 2**31 - 1  # free memory the heap may keep at its top (mallopt takes an int)


def gpu_present() -> bool:
    """Is there a GPU the model will run on? Asked before torch loads, so from the device files."""
    return bool(glob.glob("/dev/nvidia[0-9]*") or os.path.exists("/dev/kfd"))


def openmp_wait_env(environ, others_running: float | None) -> dict[str, str]:
    """How torch's idle OpenMP threads should wait, as environment variables to add ({}: the user chose).

    Between the many small parallel regions of a training step, libgomp's threads either spin (its default, long)
    or sleep. Long spinning starves whatever else needs the cores (a loader worker, another job); sleeping pays a
    wake-up at every region. So: a short spin when nothing else was runnable at the start, sleeping otherwise,
    and always sleeping when a launcher started several processes on this machine (they share the cores).
    """
    if "OMP_WAIT_POLICY" in environ or "GOMP_SPINCOUNT" in environ:
        return {}
    siblings = environ.get("LOCAL_WORLD_SIZE", "1")
    alone = not siblings.isdigit() or int(siblings) <= 1
    if alone and others_running is not None and others_running < 0.5:
        return {"GOMP_SPINCOUNT": "10000"}
    return {"OMP_WAIT_POLICY": "PASSIVE"}


def others_running(samples: int = 8, gap_s: float = 0.002, loadavg: str = "/proc/loadavg") -> float | None:
    """Mean number of runnable threads on this machine besides this one (Linux /proc/loadavg), or None."""
    import time

    counts = []
    try:
        for _ in range(samples):
            with open(loadavg) as f:
                counts.append(int(f.read().split()[3].split("/")[0]) - 1)
            time.sleep(gap_s)
    except (OSError, ValueError, IndexError):
        return None
    return sum(counts) / len(counts)


def configure_openmp() -> None:
    """Choose the OpenMP wait policy before torch loads (libgomp reads it once), on machines without a GPU."""
    if "torch" in sys.modules or gpu_present():
        return
    os.environ.update(openmp_wait_env(os.environ, others_running()))


def malloc_tuned_by_user(environ) -> bool:
    """Did the user set glibc's malloc tunables, or MAECLI_KEEP_FREED_MEMORY=0? Then the heap is left alone."""
    return (
        any(k in environ for k in MALLOC_SETTINGS)
        or "glibc.malloc." in environ.get("GLIBC_TUNABLES", "")
        or environ.get("MAECLI_KEEP_FREED_MEMORY", "1").strip().lower() in ("0", "no", "false", "off")
    )


def keep_freed_memory(environ=None) -> bool:
    """Tell glibc's malloc to serve every block from its heap and keep freed memory there; True if it was set.

    torch allocates each CPU activation with malloc and frees it moments later. By default glibc maps large blocks
    afresh and returns them on free, so every training step faults in and zeroes the same pages again. Keeping
    them costs the process its high-water mark until it exits. No effect on other C libraries.
    """
    if malloc_tuned_by_user(os.environ if environ is None else environ):
        return False
    try:
        if not os.confstr("CS_GNU_LIBC_VERSION"):
            return False
        import ctypes

        libc = ctypes.CDLL(None)  # the symbols already loaded into this process, glibc's among them
        return bool(libc.mallopt(M_MMAP_MAX, 0)) and bool(libc.mallopt(M_TRIM_THRESHOLD, KEEP_FREE_BYTES))
    except (AttributeError, ValueError, OSError, TypeError):
        return False


def tune_for_cpu(device) -> None:
    """What the CLI applies once the model's device is known: the heap setting, on a CPU only."""
    if device.type == "cpu":
        keep_freed_memory()
