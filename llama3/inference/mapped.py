"""Pages of memory-mapped checkpoint files: once a weight's bytes have been copied (fused, moved to huge
pages, quantized), its mapped pages can leave the process's resident set, so the copy never sits beside
its source. The kernel keeps them in its page cache; touched again they are read back from the file.
Kept apart from `fast.py` and `quantize.py`, which both use it (neither imports the other at load)."""

from __future__ import annotations

import ctypes
import functools
import mmap
import sys

import torch

__all__ = ["populate_file_pages", "release_file_pages"]


def _file_mappings() -> list[tuple[int, int]]:
    """Address ranges of this process's mappings of regular files (from /proc/self/maps; [] elsewhere)."""
    try:
        with open("/proc/self/maps") as f:
            lines = f.readlines()
    except OSError:
        return []
    ranges = []
    for line in lines:
        fields = line.split(maxsplit=5)
        # a file mapping has a nonzero inode and a path; anonymous memory, heap and stacks have neither
        if len(fields) == 6 and fields[4] != "0" and fields[5].startswith("/"):
            start, end = (int(x, 16) for x in fields[0].split("-"))
            ranges.append((start, end))
    return ranges


_MADV_DONTNEED = 4  # Linux; Python's mmap module offers madvise only on its own mmap objects
_MADV_POPULATE_READ = 22  # Linux 5.14+: map the pages in now, as reads would, without copying anything


@functools.lru_cache(maxsize=1)
def _madvise():
    libc = ctypes.CDLL(None, use_errno=True)
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    return libc.madvise


def release_file_pages(tensor: torch.Tensor, mappings: list[tuple[int, int]] | None = None) -> int:
    """Drop the resident pages of a tensor that is a view of a memory-mapped file (a safetensors shard loaded
    zero-copy), once its data has been copied elsewhere, so the copy does not sit beside its source in our
    resident set. The kernel keeps them in its page cache, and touched again they are read back from the
    file, so a later reader still sees the stored values. Anything not inside a file mapping is left alone
    (on anonymous memory MADV_DONTNEED would zero the data). `mappings`: this process's file mappings as
    `_file_mappings()` lists them, read once by a caller that releases many tensors (the list is ~1000 lines
    of /proc/self/maps, 3 ms a read). Returns the bytes released."""
    if sys.platform != "linux" or tensor.device.type != "cpu" or tensor.numel() == 0:
        return 0
    page = mmap.PAGESIZE
    start = (tensor.data_ptr() + page - 1) // page * page  # whole pages inside this tensor only
    end = (tensor.data_ptr() + tensor.numel() * tensor.element_size()) // page * page
    if mappings is None:
        mappings = _file_mappings()
    if end <= start or not any(lo <= start and end <= hi for lo, hi in mappings):
        return 0
    if _has_private_copies(start, end):
        return 0  # written to since it was mapped (a private copy): dropping it would undo the write
    _madvise()(ctypes.c_void_p(start), ctypes.c_size_t(end - start), _MADV_DONTNEED)
    return end - start


_PAGE_FILE = 1 << 61  # /proc/self/pagemap: "page is file-page or shared-anon"; bit 63 is "present"


def _has_private_copies(start: int, end: int) -> bool:
    """Whether a page of a file mapping between `start` and `end` is resident as a private (anonymous) copy,
    i.e. was written after mapping. Unknown (no pagemap) counts as yes."""
    page = mmap.PAGESIZE
    try:
        with open("/proc/self/pagemap", "rb") as f:
            f.seek(start // page * 8)
            entries = torch.frombuffer(bytearray(f.read((end - start) // page * 8)), dtype=torch.int64)
    except (OSError, ValueError):
        return True
    present = entries < 0  # bit 63, the sign bit of an int64
    return bool((present & ((entries & _PAGE_FILE) == 0)).any())


def populate_file_pages(tensors: list[torch.Tensor]) -> int:
    """Map in, ahead of their first use, the pages of the tensors that are views of memory-mapped files (a
    safetensors shard or GGUF file loaded zero-copy). A first forward would otherwise take a page fault per
    few pages of every weight (4 KiB pages: ~600K of them for a 1B model's 2.5 GB); MADV_POPULATE_READ
    fills the page tables in one call per run of memory, the file's data already in the page cache when it
    was read recently (and read from disk now otherwise, as the forward would). Nothing is copied: the
    resident set grows by the pages the first forward would have touched anyway. Tensors not inside a file
    mapping are left alone. Returns the bytes populated (0 off Linux or on kernels without the advice).
    Not called at load yet: at the 1B shape (bf16 folder, warm page cache, busy 2-core Zen 3) it cost about as
    much before the first forward (~0.5 s) as it saved in it (BENCHMARKS.md, "Prompts on 16-bit weights")."""
    if sys.platform != "linux":
        return 0
    mappings = _file_mappings()
    page = mmap.PAGESIZE
    spans = []
    for t in tensors:
        if t.device.type != "cpu" or t.numel() == 0:
            continue
        start = t.data_ptr() // page * page
        end = -(-(t.data_ptr() + t.numel() * t.element_size()) // page) * page
        if any(lo <= start and end <= hi for lo, hi in mappings):
            spans.append((start, end))
    total = 0
    for start, end in _merged(spans):
        if _madvise()(ctypes.c_void_p(start), ctypes.c_size_t(end - start), _MADV_POPULATE_READ) != 0:
            return total  # an older kernel (EINVAL): the first forward maps the pages as before
        total += end - start
    return total


def _merged(spans: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Overlapping or touching address ranges joined, in address order: one madvise call per run."""
    out: list[tuple[int, int]] = []
    for start, end in sorted(spans):
        if out and start <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], end))
        else:
            out.append((start, end))
    return out
