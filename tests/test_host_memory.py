"""Host memory freed by loading goes back to the system (glibc's malloc_trim, engine/host_memory.py)."""

from __future__ import annotations

import sys

import numpy as np
import pytest

from jaxmap.engine.host_memory import _malloc_trim, resident_mib, return_freed_heap


@pytest.mark.skipif(not sys.platform.startswith("linux") or _malloc_trim() is None, reason="needs glibc")
def test_freed_small_blocks_leave_resident_memory():
    """Blocks below glibc's mmap threshold stay resident once freed (a later block pins the heap's top); handing
    the free pages back takes them out of the resident set."""
    blocks = [np.ones(16_000, np.float64) for _ in range(2_000)]  # 125 KiB each, 244 MiB in all, on the heap
    pin = np.ones(16_000, np.float64)
    del blocks
    before = resident_mib()
    return_freed_heap()
    after = resident_mib()
    assert pin.sum() == 16_000
    assert before - after >= 100, (before, after)
