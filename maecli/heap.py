"""The C heap under torch's CPU tensors (glibc malloc): keep freed memory while training, give it back on request.

torch allocates every CPU activation with malloc and frees it a moment later. glibc serves large blocks
(above a threshold between 128 KiB and 32 MiB) with a fresh mmap and unmaps them on free, and it hands the
top of its heap back to the OS when enough is free there. Either way the next step's tensors land on pages
the kernel has to fault in and zero again: a ViT-Tiny training step at 64 px faulted ~50,000 pages (200 MB)
every step here, and a ViT-Tiny forward over 256 images ~460,000. On this 2-core VM a page fault costs about
a microsecond: about a fifth of such a step or forward, and 40% of a step whose activations outgrow 32 MiB
(benchmarks/RESULTS.md, the third session's levers).

Nothing here imports torch: the command line sets this up before the first tensor exists.
"""
from __future__ import annotations

import os

M_TRIM_THRESHOLD = -1  # mallopt parameter numbers, from glibc's malloc.h
M_MMAP_MAX = -4
KEEP_FREE_BYTES = 2**31 - 1  # free memory the heap may keep at its top (mallopt takes an int)
USER_SETTINGS = ("MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_MAX_", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TOP_PAD_")

_libc = None


def glibc():
    """The process's glibc (ctypes), or None on other C libraries and systems."""
    global _libc
    if _libc is None:
        _libc = False
        try:
            if os.confstr("CS_GNU_LIBC_VERSION"):
                import ctypes

                _libc = ctypes.CDLL(None)  # the symbols already loaded into this process, libc among them
        except (AttributeError, ValueError, OSError, TypeError):
            pass
    return _libc or None


def user_tuned(environ) -> bool:
    """Did the user set glibc's malloc tunables, or MAECLI_KEEP_FREED_MEMORY=0? Then maecli leaves the heap alone."""
    return (any(k in environ for k in USER_SETTINGS) or "glibc.malloc." in environ.get("GLIBC_TUNABLES", "")
            or environ.get("MAECLI_KEEP_FREED_MEMORY", "1").strip().lower() in ("0", "no", "false", "off"))


def keep_freed_memory(environ=None) -> bool:
    """Serve every allocation from the heap and keep freed memory there for reuse; True if it was set.

    The process keeps its high-water mark (a training step reaches it again every step anyway) instead of
    returning memory between steps; `trim_heap()` still gives the free part back when asked. A user's own
    MALLOC_* / GLIBC_TUNABLES malloc settings win, MAECLI_KEEP_FREED_MEMORY=0 keeps glibc's default behaviour,
    and it does nothing on other C libraries.
    """
    libc = glibc()
    if libc is None or user_tuned(os.environ if environ is None else environ):
        return False
    # no mmap for large blocks (they come from the heap like small ones), and no trimming of the heap's top
    return bool(libc.mallopt(M_MMAP_MAX, 0)) and bool(libc.mallopt(M_TRIM_THRESHOLD, KEEP_FREE_BYTES))


def trim_heap() -> bool:
    """Give the heap's free pages back to the OS (glibc's malloc_trim); False where there is no glibc.

    A long inference stream allocates and frees the same activations batch after batch; glibc keeps the
    freed pieces, and `maecli embed`'s resident memory crept up ~10% over the first 15,000 images before it
    levelled off. Trimming every few batches keeps it flat at no measurable cost (benchmarks/RESULTS.md).
    """
    libc = glibc()
    if libc is None:
        return False
    libc.malloc_trim(0)
    return True
