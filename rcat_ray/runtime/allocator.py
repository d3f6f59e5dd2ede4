"""Keep the C heap from handing freed tensor memory back to the kernel between attack steps.

An attack repeats the same forward and backward passes hundreds of times per chunk, so a process frees and
re-allocates the same activation buffers (megabytes each) at every step. glibc's ``malloc`` returns the free
top of its heap to the kernel once it exceeds a trim threshold, and serves large requests with fresh
``mmap`` calls; either way the next step touches new pages and pays a page fault per 4 KiB. Measured on a
CPU Ray actor attacking 125 Fashion-MNIST images with APGD-CE + APGD-DLR: 40,000-320,000 minor faults and
0.1-0.4 s of system time per chunk (3-13 % of the chunk), against ~0 for the same chunk in the driver
process (presumably because glibc had already raised its thresholds there: it adapts them after freeing a
large mapped block). Raising both thresholds once per worker process removes the faults (measured: 6 per
chunk) without changing any result.

The price is memory kept: freed blocks stay in the process for the next step instead of going back, so a
worker's resident size stays near its working set rather than rising and falling around it, and the peak can
grow a little where kept blocks do not fit the next requests (measured: about 50 MiB on a 224 px evaluation
actor of ~1 GB). Only glibc has these knobs (``mallopt``); on another C library, or where it cannot be
loaded, this does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import logging
import platform

log = logging.getLogger(__name__)

#: ``mallopt`` parameter numbers from glibc's <malloc.h>.
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
#: Free heap top kept before trimming: above an attack step's working set on a CPU worker.
TRIM_THRESHOLD_BYTES = 512 * 2**20
#: Requests served from the heap rather than by their own mapping: glibc's ceiling on 64-bit systems
#: (HEAP_MAX_SIZE / 2); larger buffers (224 px activations of a large batch) are mapped whatever is set.
MMAP_THRESHOLD_BYTES = 32 * 2**20


@functools.cache
def retain_freed_heap() -> bool:
    """Raise glibc's trim and mmap thresholds for this process (once; later calls return the first result).

    Returns whether the settings took effect (False on a non-glibc system).
    """
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        ok = bool(libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES)) and bool(
            libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)
        )
    except (OSError, AttributeError) as err:
        log.debug("mallopt unavailable: %s", err)
        return False
    return ok
