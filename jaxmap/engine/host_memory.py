"""Giving the host memory that loading freed back to the operating system.

Loading repacks quantized blocks, stacks scanned layers and copies arrays into XLA's buffers; the temporaries are
freed, but glibc's allocator keeps the freed pages in its arenas, where they stay in the process's resident memory
(the default model: 90 MiB, as much as its weights). ``malloc_trim`` hands them back, so the run that follows
(KV cache, compiled programs) does not stack its own peak on top of the load's leftovers.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import logging
import os
import sys

log = logging.getLogger(__name__)


@functools.cache
def _malloc_trim():
    if not sys.platform.startswith("linux"):
        return None
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name or "libc.so.6")
        trim = libc.malloc_trim  # glibc only (musl has none)
    except (OSError, AttributeError):
        return None
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return trim


def resident_mib() -> int | None:
    """This process's resident memory in MiB (Linux), or None."""
    try:
        with open("/proc/self/statm", encoding="ascii") as f:
            pages = int(f.read().split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return pages * os.sysconf("SC_PAGE_SIZE") // (1 << 20)


def return_freed_heap() -> None:
    """Release the allocator's free pages (glibc's ``malloc_trim(0)``); nothing where there is no glibc."""
    trim = _malloc_trim()
    if trim is None:
        return
    before = resident_mib()
    trim(0)
    after = resident_mib()
    if before is not None and after is not None:
        log.debug("returned %d MiB of freed host memory to the system (resident %d -> %d MiB)", before - after,
                  before, after)
