"""Keep freed host memory inside the process while training on CPU (glibc's malloc).

glibc gives large blocks back to the kernel as soon as they are freed: blocks above its mmap threshold
are unmapped, and the top of the heap is trimmed once more than M_TRIM_THRESHOLD of it is free. A
training step allocates and frees the same activations, gradients and weight casts every time, so every
step touches freshly mapped pages and takes a page fault for each 4 KiB of them: about 110k faults
(430 MB) a full-finetuning step of the default model. With glibc told to keep what it frees (no mmap,
no trimming), the next step reuses the same pages, as PyTorch's caching allocator does on CUDA.

Measured with `benchmarks/allocator_env.py` (docs/benchmarks.md): full finetuning 1.13x on an Intel Xeon
with AMX and 1.03-1.07x on an AMD EPYC, for 350-500 MiB more peak RSS; LoRA unchanged on both.

It is glibc's public `mallopt`, applied for the training loop only and undone after it (the kept memory
is then handed back with `malloc_trim`). Nothing happens on other C libraries (macOS, musl) or where
the user already tuned malloc through the environment.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
from collections.abc import Iterator
from contextlib import contextmanager

# mallopt parameters (glibc's malloc.h)
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD, M_MMAP_MAX = -1, -3, -4
DEFAULT_MMAP_MAX = 65536
# The ceiling of glibc's own mmap threshold (DEFAULT_MMAP_THRESHOLD_MAX: 32 MiB on 64-bit), where a process's
# threshold ends up once it has freed a block that large, and the trim threshold glibc pairs with it (twice).
WARM_MMAP_THRESHOLD = 4 * 1024 * 1024 * ctypes.sizeof(ctypes.c_long)
WARM_TRIM_THRESHOLD = 2 * WARM_MMAP_THRESHOLD
NEVER_TRIM = 2**31 - 1  # mallopt takes an int: trim only when 2 GiB sit free at the top of the heap

# environment variables through which a user tunes glibc's malloc; if any is set, it is left alone
USER_SETTINGS = ("MALLOC_MMAP_MAX_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TOP_PAD_")


def _glibc() -> ctypes.CDLL | None:
    """The process's C library if it is glibc (it has `mallopt` and `malloc_trim`), else None."""
    name = ctypes.util.find_library("c")
    if not name:
        return None
    try:
        libc = ctypes.CDLL(name)
        libc.gnu_get_libc_version  # noqa: B018 -- glibc only
        libc.mallopt, libc.malloc_trim  # noqa: B018
    except (OSError, AttributeError):
        return None
    return libc


def user_tuned_malloc() -> bool:
    """Whether the environment already sets glibc's malloc parameters (then they are the user's choice)."""
    return any(v in os.environ for v in USER_SETTINGS) or "glibc.malloc." in os.environ.get("GLIBC_TUNABLES", "")


@contextmanager
def kept(enabled: bool = True) -> Iterator[bool]:
    """Within the block, freed memory stays in the process for reuse; yields whether that was applied.

    On exit the kept memory is returned to the kernel and glibc is left as its own adjustment leaves a warmed-up
    process: blocks of up to 32 MiB come from the heap and are reused, larger ones are mapped and unmapped.
    (Setting any threshold turns that adjustment off for the rest of the process, so restoring the initial
    values, 128 KiB, would map every block above 128 KiB fresh: a forward pass of the default model over 8 x 256
    tokens after the block took 85-92k page faults, against 50-53k so; its time moved within the noise.)"""
    libc = _glibc() if enabled and not user_tuned_malloc() else None
    if libc is None:
        yield False
        return
    applied = libc.mallopt(M_MMAP_MAX, 0) == 1 and libc.mallopt(M_TRIM_THRESHOLD, NEVER_TRIM) == 1
    try:
        yield applied
    finally:
        libc.mallopt(M_MMAP_MAX, DEFAULT_MMAP_MAX)
        libc.mallopt(M_MMAP_THRESHOLD, WARM_MMAP_THRESHOLD)
        libc.mallopt(M_TRIM_THRESHOLD, WARM_TRIM_THRESHOLD)
        libc.malloc_trim(0)
