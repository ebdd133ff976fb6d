"""Restored KV rows into GPU memory by DMA, on MLX's CUDA backend (the CUDA runtime, ctypes).

MLX's CUDA arrays are managed memory (`cudaMallocManaged`). A restore that lets the host
write into them directly makes every page fault over to the host, and at the first GPU
pass fault back: measured on an H200 (`gpu.py split`, 1.07 GB) 0.11 s of host writes plus
0.09 s of first GPU pass per GB, against 13 GB/s for reading the same bytes from the page
cache on 8 threads. So on CUDA a restore reads each block into pinned host memory, checks
it there, and has the copy engine move it (`cudaMemcpy2DAsync`, one call per array and
block) into arrays that MLX allocated and zeroed on the GPU: the pages never leave the GPU.

Everything here is optional: without a loadable CUDA runtime, or after any CUDA error,
`staging()` answers None and the restore fills the managed arrays from the host as before.
Restores use it only on the CUDA backend (`restore_arrays._cuda_staging`); its tests run anywhere.
"""

from __future__ import annotations

import ctypes
import glob
import logging
import os
import queue
import sys
import threading

import numpy as np

log = logging.getLogger("agentd.cuda_copy")

_MEMCPY_DEFAULT = 4  # cudaMemcpyDefault: the pointers say which side they are on (UVA)
_STREAM_NON_BLOCKING = 1
# "device": each block crosses the bus in one copy and is laid out on the GPU; otherwise
# (the default) one 2-D copy per array goes straight from pinned memory (benchmarks/gpu.py restore).
MODE_ENV = "AGENTD_CUDA_STAGING"
_RUNTIME_NAMES = ("libcudart.so.13", "libcudart.so.12", "libcudart.so")


class CudaError(RuntimeError):
    pass


def _find_runtime() -> ctypes.CDLL | None:
    """The CUDA runtime library: by soname, else from pip's nvidia-* packages on sys.path."""
    candidates = list(_RUNTIME_NAMES)
    for base in sys.path:
        candidates += sorted(glob.glob(os.path.join(base, "nvidia", "**", "libcudart.so*"), recursive=True))
    for name in candidates:
        try:
            return ctypes.CDLL(name)
        except OSError:
            continue
    return None


class _Runtime:
    """The few CUDA runtime calls a staged copy needs. ctypes drops the GIL around each."""

    def __init__(self, lib: ctypes.CDLL):
        self.lib = lib
        vp, sz = ctypes.c_void_p, ctypes.c_size_t
        lib.cudaHostAlloc.argtypes = [ctypes.POINTER(vp), sz, ctypes.c_uint]
        lib.cudaFreeHost.argtypes = [vp]
        lib.cudaFree.argtypes = [vp]
        lib.cudaStreamCreateWithFlags.argtypes = [ctypes.POINTER(vp), ctypes.c_uint]
        lib.cudaStreamSynchronize.argtypes = [vp]
        lib.cudaMemcpy2DAsync.argtypes = [vp, sz, vp, sz, sz, sz, ctypes.c_int, vp]
        lib.cudaMemcpyAsync.argtypes = [vp, vp, sz, ctypes.c_int, vp]
        lib.cudaMalloc.argtypes = [ctypes.POINTER(vp), sz]
        lib.cudaGetErrorString.restype = ctypes.c_char_p
        lib.cudaGetErrorString.argtypes = [ctypes.c_int]
        for fn in ("cudaHostAlloc", "cudaFreeHost", "cudaStreamCreateWithFlags", "cudaStreamSynchronize",
                   "cudaMemcpy2DAsync", "cudaMemcpyAsync", "cudaMalloc"):
            getattr(lib, fn).restype = ctypes.c_int

    def check(self, rc: int, what: str) -> None:
        if rc != 0:
            raise CudaError(f"{what}: {self.lib.cudaGetErrorString(rc).decode(errors='replace')} ({rc})")

    def host_alloc(self, nbytes: int) -> int:
        ptr = ctypes.c_void_p()
        self.check(self.lib.cudaHostAlloc(ctypes.byref(ptr), nbytes, 0), f"cudaHostAlloc({nbytes})")
        return ptr.value

    def device_alloc(self, nbytes: int) -> int:
        ptr = ctypes.c_void_p()
        self.check(self.lib.cudaMalloc(ctypes.byref(ptr), nbytes), f"cudaMalloc({nbytes})")
        return ptr.value

    def copy(self, dst: int, src: int, nbytes: int, stream: int) -> None:
        self.check(self.lib.cudaMemcpyAsync(dst, src, nbytes, _MEMCPY_DEFAULT, stream), "cudaMemcpyAsync")

    def stream(self) -> int:
        s = ctypes.c_void_p()
        self.check(self.lib.cudaStreamCreateWithFlags(ctypes.byref(s), _STREAM_NON_BLOCKING), "cudaStreamCreate")
        return s.value

    def copy_2d(self, dst: int, dpitch: int, src: int, spitch: int, width: int, height: int, stream: int) -> None:
        self.check(self.lib.cudaMemcpy2DAsync(dst, dpitch, src, spitch, width, height, _MEMCPY_DEFAULT, stream),
                   "cudaMemcpy2DAsync")

    def sync(self, stream: int) -> None:
        self.check(self.lib.cudaStreamSynchronize(stream), "cudaStreamSynchronize")


class Slot:
    """Pinned host memory and a stream of its own: one block in flight."""

    def __init__(self, rt: _Runtime, nbytes: int, via_device: bool = False):
        self.nbytes = nbytes
        self.ptr = rt.host_alloc(nbytes)
        self.stream = rt.stream()
        self.host = np.ctypeslib.as_array((ctypes.c_uint8 * nbytes).from_address(self.ptr))
        # The block crosses the bus in one copy, then is laid out by device-to-device copies.
        self.device = rt.device_alloc(nbytes) if via_device else None


class Staging:
    """A pool of pinned slots, shared by every restore of the process: pinned memory is slow
    to allocate, so it is kept. Thread-safe: each of a restore's read threads takes a slot,
    and a slot is made when none is free, up to `max_slots`."""

    def __init__(self, rt: _Runtime, max_slots: int = 8, via_device: bool = False):
        self.rt = rt
        self.max_slots = max_slots
        self.via_device = via_device
        self._free: queue.Queue[Slot] = queue.Queue()
        self._lock = threading.Lock()
        self._made = 0
        self._slot_bytes = 0  # slots are all this size; a larger request replaces them

    def reserve(self, nbytes: int, count: int) -> None:
        """Make `count` slots of at least `nbytes` now (the daemon does at start, so the
        first restore does not pay for pinning memory)."""
        self.max_slots = max(self.max_slots, count)
        slots = [self.take(nbytes) for _ in range(count)]
        for slot in slots:
            self.give(slot)

    def take(self, nbytes: int) -> Slot:
        with self._lock:
            self._slot_bytes = max(self._slot_bytes, nbytes)  # smaller slots are freed as they come back
            make = self._free.empty() and self._made < self.max_slots
            if make:
                self._made += 1
        while not make:
            slot = self._free.get()
            if slot.nbytes >= nbytes:
                return slot
            self._retire(slot)  # too small: a new one takes its place
            with self._lock:
                self._made += 1
            make = True
        try:
            return Slot(self.rt, self._slot_bytes, self.via_device)
        except CudaError:
            with self._lock:
                self._made -= 1
            raise

    def give(self, slot: Slot) -> None:
        if slot.nbytes < self._slot_bytes:
            self._retire(slot)
        else:
            self._free.put(slot)

    def _retire(self, slot: Slot) -> None:
        with self._lock:
            self._made -= 1
        self.rt.lib.cudaFreeHost(ctypes.c_void_p(slot.ptr))
        if slot.device is not None:
            self.rt.lib.cudaFree(ctypes.c_void_p(slot.device))

    def upload(self, slot: Slot, copies: list[tuple[int, int, int, int, int, int]]) -> None:
        """(dst, dpitch, src offset in the slot, spitch, width, height) each, then wait for them."""
        src = slot.ptr
        if slot.device is not None:
            self.rt.copy(slot.device, slot.ptr, max(off + spitch * height for _d, _p, off, spitch, _w, height in copies),
                         slot.stream)
            src = slot.device
        for dst, dpitch, off, spitch, width, height in copies:
            self.rt.copy_2d(dst, dpitch, src + off, spitch, width, height, slot.stream)
        self.rt.sync(slot.stream)


_staging: Staging | None = None
_disabled = False
_init_lock = threading.Lock()


def staging() -> Staging | None:
    """The process's staging pool, or None where the CUDA runtime cannot be used."""
    global _staging, _disabled
    if _staging is not None or _disabled:
        return _staging
    with _init_lock:
        if _staging is None and not _disabled:
            lib = _find_runtime()
            if lib is None:
                log.warning("CUDA runtime library not found: restores fill GPU arrays from the host")
                _disabled = True
            else:
                _staging = Staging(_Runtime(lib), via_device=os.environ.get(MODE_ENV, "").strip() == "device")
    return _staging


def disable(reason: str) -> None:
    """After a CUDA error: restores of this process go back to host fills."""
    global _staging, _disabled
    if not _disabled:
        log.warning("staged GPU copies off for this process: %s", reason)
    _staging, _disabled = None, True
