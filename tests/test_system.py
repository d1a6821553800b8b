"""retain_freed_memory: large freed blocks stay in the heap for reuse (glibc), and the opt-out works."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

PROBE = r"""
import ctypes, ctypes.util, sys
import numpy as np
from densebench.system import retain_freed_memory

class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd",
                                                     "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]

libc = ctypes.CDLL(ctypes.util.find_library("c"))
libc.mallinfo2.restype = MallInfo2
active = retain_freed_memory()
block = np.ones(100 * 2 ** 20 // 8)          # 100 MiB: above glibc's default mmap threshold
mapped_while_alive = libc.mallinfo2().hblkhd
del block
print(active, mapped_while_alive >= 100 * 2 ** 20, libc.mallinfo2().fordblks >= 100 * 2 ** 20)
"""


def _probe(env_value):
    env = dict(os.environ)
    env.pop("DENSEBENCH_RETAIN_FREED_MEMORY", None)
    if env_value is not None:
        env["DENSEBENCH_RETAIN_FREED_MEMORY"] = env_value
    out = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, check=True)
    return out.stdout.split()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc only")
def test_large_freed_blocks_stay_in_the_heap():
    try:
        import ctypes.util
        import ctypes
        ctypes.CDLL(ctypes.util.find_library("c")).mallinfo2
    except (OSError, AttributeError, TypeError):
        pytest.skip("no glibc >= 2.33")
    active, mapped, retained = _probe(None)
    assert (active, mapped, retained) == ("True", "False", "True")     # heap block, kept after free
    active, mapped, retained = _probe("0")
    assert (active, mapped, retained) == ("False", "True", "False")    # default glibc: own mmap, returned
