"""The staged restore of agentd.cuda_copy, run here without a GPU: the CUDA runtime (a true
system edge) is replaced by one that copies with memmove, so the slot pool, the 2-D copy
arithmetic into the cache's arrays, the checks before any copy and the fall-back after a
CUDA error are all exercised on the CPU. tests/test_cuda.py runs the real thing on a GPU."""

from __future__ import annotations

import ctypes
import threading

import mlx.core as mx
import numpy as np
import pytest

from agentd import cuda_copy, restore_arrays, restore_reads
from agentd.agents import AgentStore
from agentd.engine import Engine
from agentd.kvstore import KVSettings

SYSTEM = "You are a technical specialist. Explain root causes and the steps to fix them. " * 4


class MemmoveRuntime:
    """The calls cuda_copy makes, done on the host: pinned memory is plain memory, a 2-D
    copy is one memmove per row, a stream is a number."""

    def __init__(self, fail_copies: bool = False):
        self.fail_copies = fail_copies
        self.buffers, self.copies, self.freed = {}, 0, 0
        self.lib = self

    def check(self, rc, what):  # pragma: no cover - the fake never fails that way
        pass

    def host_alloc(self, nbytes: int) -> int:
        buf = ctypes.create_string_buffer(nbytes)
        self.buffers[ctypes.addressof(buf)] = buf
        return ctypes.addressof(buf)

    def cudaFreeHost(self, ptr) -> int:
        self.freed += 1
        self.buffers.pop(ptr.value, None)
        return 0

    device_alloc = host_alloc

    def cudaFree(self, ptr) -> int:
        return self.cudaFreeHost(ptr)

    def copy(self, dst, src, nbytes, stream) -> None:
        self.copies += 1
        ctypes.memmove(dst, src, nbytes)

    def stream(self) -> int:
        return 1

    def copy_2d(self, dst, dpitch, src, spitch, width, height, stream) -> None:
        if self.fail_copies:
            raise cuda_copy.CudaError("cudaMemcpy2DAsync: an illegal memory access was encountered (700)")
        self.copies += 1
        for row in range(height):
            ctypes.memmove(dst + row * dpitch, src + row * spitch, width)

    def sync(self, stream) -> None:
        pass


@pytest.fixture(scope="module")
def engine(tiny_llama_dir):
    return Engine(tiny_llama_dir)


@pytest.fixture(params=["pinned", "device"])
def staged(monkeypatch, request):
    """RowTarget stages through a fresh pool on the memmove runtime, copying straight from
    pinned memory or through a device buffer (AGENTD_CUDA_STAGING); yields that runtime."""
    rt = MemmoveRuntime()
    pool = cuda_copy.Staging(rt, max_slots=3, via_device=request.param == "device")
    monkeypatch.setattr(restore_arrays, "_cuda_staging", lambda: None if cuda_copy._disabled else pool)
    monkeypatch.setattr(cuda_copy, "_staging", pool)
    monkeypatch.setattr(cuda_copy, "_disabled", False)
    yield rt


def rows(layer) -> list:
    return [*layer.keys, *layer.values] if isinstance(layer.keys, tuple) else [layer.keys, layer.values]


def saved_agent(engine, home, name="a"):
    store = AgentStore(home, engine, kv=KVSettings(block_tokens=16))
    store.create(name, "", SYSTEM * 2)
    store.chat(name, "The payment API returns a 500 error.", max_tokens=7)
    if len(store._hot[name].tokens) % 16 == 0:  # blocks and a tail, both staged
        store.chat(name, "Fine, go on.", max_tokens=3)
    store.save(name)
    return store


def assert_same_rows(want: list, got: list, n: int) -> None:
    for a, b in zip(want, got):
        assert a.offset == b.offset == n
        for x, y in zip(rows(a), rows(b)):
            assert np.array_equal(np.array(x[..., :n, :]), np.array(y[..., :n, :]))


def test_a_staged_restore_lands_every_row_in_place(engine, home, staged):
    store = saved_agent(engine, home)
    hot = store._hot["a"]
    loaded = store.repo.load("a")
    n = len(hot.tokens)
    assert loaded.tokens == hot.tokens and n > 3 * 16 and n % 16
    assert_same_rows(hot.cache, loaded.cache, n)
    # One 2-D copy per array and block (or tail segment): heads strided n_alloc rows apart.
    arrays = sum(len(rows(layer)) for layer in hot.cache)
    segments = -(-n // 16)
    assert staged.copies >= arrays * segments
    # The pool made at most its three slots (and their device buffers), whatever the number
    # of read threads.
    assert 1 <= len(staged.buffers) <= 6


def test_a_block_that_fails_its_check_is_never_copied_to_the_device(engine, home, staged):
    store = saved_agent(engine, home)
    m = store.repo._manifests["a"]
    second = home / "caches" / "blocks" / (m["blocks"][1] + ".kvb")
    data = bytearray(second.read_bytes())
    data[-100] ^= 0xFF  # a flipped bit in its rows
    second.write_bytes(bytes(data))
    loaded = store.repo.load("a")
    assert len(loaded.tokens) == 16  # the prefix before the bad block; the rest is prefilled again
    for layer in loaded.cache:
        for a in rows(layer):
            assert not np.any(np.array(a[..., 16:32, :]))  # the refused rows never landed


def test_after_a_cuda_error_the_restore_fills_from_the_host_and_stays_exact(engine, home, staged, caplog):
    store = saved_agent(engine, home)
    staged.fail_copies = True
    hot = store._hot["a"]
    loaded = store.repo.load("a")
    assert loaded.tokens == hot.tokens
    assert_same_rows(hot.cache, loaded.cache, len(hot.tokens))
    assert cuda_copy._disabled and cuda_copy.staging() is None
    assert "staged GPU copies off" in caplog.text


def test_the_pool_replaces_slots_too_small_for_a_larger_request():
    rt = MemmoveRuntime()
    pool = cuda_copy.Staging(rt, max_slots=2)
    pool.reserve(1000, 2)
    assert len(rt.buffers) == 2
    slot = pool.take(5000)
    assert slot.nbytes >= 5000
    pool.give(slot)
    again = [pool.take(5000), pool.take(5000)]
    assert all(s.nbytes >= 5000 for s in again) and rt.freed == 2
    for s in again:
        pool.give(s)
    assert mx.array([1]).item() == 1  # MLX untouched by the fake


def test_blocks_are_read_and_checked_while_the_arrays_are_made(engine, home, staged, monkeypatch):
    """On CUDA making the arrays is the first touch of new GPU memory (0.2 s for 4 GB): the
    read threads fill their pinned slots meanwhile and copy only once the arrays exist."""
    store = saved_agent(engine, home)
    hot = store._hot["a"]
    checked = threading.Semaphore(0)
    real_read, real_make = restore_reads.read_segment, restore_arrays.RowTarget._make_arrays
    seen = {}

    def read_segment(*args, **kwargs):  # a block's or tail segment's rows, read and checked
        real_read(*args, **kwargs)
        checked.release()

    def make_arrays(self):
        # Blocks get read before any array exists (this waits for one), none is copied yet.
        seen["read_first"] = checked.acquire(timeout=10)
        seen["copies_before"] = staged.copies
        real_make(self)

    monkeypatch.setattr(restore_reads, "read_segment", read_segment)
    monkeypatch.setattr(restore_arrays.RowTarget, "_make_arrays", make_arrays)
    loaded = store.repo.load("a")
    assert seen == {"read_first": True, "copies_before": 0}
    assert loaded.tokens == hot.tokens
    assert_same_rows(hot.cache, loaded.cache, len(hot.tokens))
