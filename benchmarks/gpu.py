"""agentd on an NVIDIA GPU (MLX's CUDA backend): speed in-process vs through agentd, restore
vs re-prefill after a restart, save/load against the disk and the host-to-device copy.

    python benchmarks/gpu.py [--models llama-8b,gemma3-12b] [--contexts 8192,32768]
                             [--runs 3] [--models-dir DIR] [--out FILE] [--quick]
    python benchmarks/gpu.py probe [--model llama-8b] [--out FILE]   (kernel-compile probe)
    python benchmarks/gpu.py split [--contexts 8192]       (a restore's pieces, in-process)
    python benchmarks/gpu.py restore [--contexts 8192,32768]   (agentd's restore, each placement)

Models are random-weight, 4-bit, of real shapes (benchmarks/gpu_models.py), since no
weights can be downloaded on the GPU machine. For each model and context:

- in-process: mlx-lm's own prefill (2,048-token chunks) and greedy decode, no agentd;
- through agentd: the daemon as a user starts it (`python -m agentd`, fresh home), its
  start-up time to ready (kernel warm-up included) and the first turn's prefill and decode;
- after a restart (SIGTERM flushes, a new process starts): the agent's next turn restored
  from its blocks ("resumed") against a fork of it made before the restart, asked with
  `rebuild` so that its whole transcript is prefilled ("rebuilt": a fork alone would load
  the blocks it shares); time to first token as the daemon reports it (restore + prefill +
  first token) and as the client sees it;
- a warm restore: the agent evicted and reloaded in the same process;
- save/load GB/s of agentd's cache file against the disk (write+fsync; read with the page
  cache dropped and hot) and the host-to-device copy of the same bytes.

Running it on the lent H200 (what was learned; keep it here):
- The machine reaches no registry. Bring wheels: `pip download --no-deps --only-binary=:all:
  --python-version 3.12 --platform manylinux_2_35_x86_64 mlx==0.32.4 mlx-cuda-13==0.32.4
  mlx-lm==0.32.2 platformdirs`; the image has numpy, safetensors, tokenizers, transformers,
  msgpack, psutil, click, rich, jinja2 and the CUDA 13 libraries mlx-cuda-13 needs.
  The ~90 MB mlx-cuda-13 wheel exceeds one call's 64 MiB: `split -b 46m`, carry part one
  and copy it to /tmp in one call, carry part two in the next (within the 30 s the machine
  stays warm), `cat` them, `pip install --no-index --no-deps --target /tmp/site *.whl` and
  put /tmp/site and the tree on PYTHONPATH.
- MLX's CUDA backend compiles kernels with NVRTC the first time a shape needs them and
  keeps the PTX in MLX_PTX_CACHE_DIR (default /tmp/mlx/<version>/ptx); agentd points it at
  its own cache dir and compiles its shapes before it reports ready (agentd.warmup).
  A "fresh machine" is simulated with empty PTX and CUDA driver caches (CUDA_CACHE_PATH).
  Cold, the first start compiles for 135-155 s (llama-8B): budget a call for it.
- The machine stays warm 30 s after a call: a second call then finds /tmp/site, the kernel
  cache and the built models still there (no second wheel transfer, no compile).
- Models build in seconds (random weights on the GPU); their tokenizer must state the
  model's context (`model_max_length`), or agentd refuses long prompts (CONTEXT_TOO_LONG).
- `mx.array` and `mx.load` cannot take more than 2**31 elements in one dimension: reshape
  byte buffers into rows of 1 MiB. Host reads of arrays MLX evaluated on the GPU stream
  (CUDA managed memory) are slower than of arrays loaded on the CPU stream (`split`).
- Host writes into MLX's managed arrays fault every page over and back (0.2 s per GB); DMA
  from pinned memory does not (`restore`: 8.7-9.2 GB/s, as fast as reading the page cache).
  The image's CUDA runtime is at site-packages/nvidia/cu13/lib/libcudart.so.13 (and
  /usr/local/cuda-13.0), which agentd.cuda_copy finds.
- Budget device time: a fresh machine takes 90-120 s to start; llama-8b's cold warm-up
  157 s, gemma3-12b's 16 s after llama's (the kernels overlap); a full llama-8b run at
  8k and 32k with 2 restarts about 140 s once warm; a 32k-only run on a fresh machine 312 s
  (first start 178 s); the CUDA tests 450-470 s with a cold kernel cache of their own.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as c  # noqa: E402
import gpu_models  # noqa: E402

NAME = "gpu"
CHUNK = 2048


def gpu_info() -> dict:
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
            capture_output=True, text=True, timeout=30,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        out = ""
    return {"nvidia_smi": out}


# ---- in-process pieces -------------------------------------------------------------------


def _sync_forward(model, tokens, cache):
    import mlx.core as mx

    t0 = time.perf_counter()
    model(mx.array(tokens)[None], cache=cache)
    mx.eval([x.state for x in cache])
    return time.perf_counter() - t0


def probe_kernels(model_dir: Path, lengths_at: list[tuple[int, int]], ptx_dir: Path) -> list[dict]:
    """Time forward passes of `q` tokens over a cache already holding `offset` tokens, and
    count the PTX files MLX wrote for each: a new file is a kernel compiled for that shape."""
    import mlx.core as mx
    from mlx_lm import load
    from mlx_lm.models.cache import make_prompt_cache

    t0 = time.perf_counter()
    model, _ = load(str(model_dir))
    rows = [{"what": "load", "s": round(time.perf_counter() - t0, 3), "ptx": _count(ptx_dir)}]
    vocab = min(1000, model.args.vocab_size)
    rng = __import__("random").Random(0)
    cache, held = make_prompt_cache(model), 0
    for q, offset in lengths_at:
        if offset < held:
            cache, held = make_prompt_cache(model), 0
        while held < offset:  # fill up to the offset (its own shapes are recorded too)
            n = min(CHUNK, offset - held)
            before = _count(ptx_dir)
            s = _sync_forward(model, [rng.randrange(vocab) for _ in range(n)], cache)
            rows.append({"what": "fill", "q": n, "offset": held, "s": round(s, 3), "new_ptx": _count(ptx_dir) - before})
            held += n
        before = _count(ptx_dir)
        s = _sync_forward(model, [rng.randrange(vocab) for _ in range(q)], cache)
        rows.append({"what": "step", "q": q, "offset": held, "s": round(s, 3), "new_ptx": _count(ptx_dir) - before})
        held += q
        mx.clear_cache()
    return rows


def _count(d: Path) -> int:
    try:
        return sum(1 for _ in Path(d).rglob("*") if _.is_file())
    except OSError:
        return -1


def probe_main(args) -> None:
    """Kernel-compile probe: the same sequence in a cold process (empty caches), then a warm one."""
    models_dir = Path(args.models_dir)
    model_dir = gpu_models.build(args.model, models_dir / args.model)
    steps = [(2048, 0), (2048, 2048), (1, 4096), (1, 4097), (32, 4098), (1, 4130), (2, 4131), (3, 4133), (5, 4136),
             (8, 4141), (13, 4149), (16, 4162), (31, 4178), (64, 4209), (100, 4273), (128, 4373), (257, 4501),
             (512, 4758), (1000, 5270), (1, 6270), (2048, 6271), (1, 8319), (32, 8320), (1, 16384), (32, 16385),
             (1, 32768), (32, 32769)]
    if args.quick:
        steps = [(s, o) for s, o in steps if o <= 4500]
    ptx = Path(tempfile.mkdtemp(prefix="ptx-"))
    cuda_cache = Path(tempfile.mkdtemp(prefix="nvcache-"))
    env = {**os.environ, "MLX_PTX_CACHE_DIR": str(ptx), "CUDA_CACHE_PATH": str(cuda_cache)}
    results = {}
    for label in ("cold", "warm"):
        proc = subprocess.run(
            [sys.executable, __file__, "_probe_child", str(model_dir), json.dumps(steps), str(ptx)],
            env=env, capture_output=True, text=True, timeout=900,
        )
        if proc.returncode:
            raise SystemExit(f"probe child failed:\n{proc.stderr[-4000:]}")
        results[label] = json.loads(proc.stdout.strip().splitlines()[-1])
        c.log(f"{label}: " + " ".join(f"{r.get('q', '')}@{r.get('offset', '')}={r['s']}s"
                                       f"{'+' + str(r['new_ptx']) if r.get('new_ptx') else ''}"
                                       for r in results[label]))
    results["ptx_files"] = sorted(p.name for p in ptx.rglob("*") if p.is_file())[:400]
    c.write_json(Path(args.out), {"machine": {**c.machine_info(), **gpu_info()}, "probe": results})


def restore_split(model_dir: Path, n_tokens: int, work: Path, runs: int = 3) -> dict:
    """Where a restore's time can go on this machine, piece by piece, on a real KV cache of
    `n_tokens` saved by mlx-lm: its own load, then the pieces agentd's loader is made of
    (read the file into memory, hash it, make it device arrays, the first GPU pass over
    them), each placement tried three ways. In-process, page cache hot."""
    import numpy as np

    import mlx.core as mx
    from mlx_lm import load
    from mlx_lm.models.cache import load_prompt_cache, make_prompt_cache, save_prompt_cache

    model, _ = load(str(model_dir))
    cache = make_prompt_cache(model)
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 1000, n_tokens).tolist()
    for lo in range(0, n_tokens, CHUNK):
        _sync_forward(model, tokens[lo:lo + CHUNK], cache)
    path = work / "mlxlm.safetensors"
    out: dict = {"tokens": n_tokens}
    t0 = time.perf_counter()
    save_prompt_cache(str(path), cache)
    out["mlxlm_save_s"], out["bytes"] = time.perf_counter() - t0, path.stat().st_size
    del cache, model
    mx.clear_cache()
    rows = []
    for _ in range(runs):
        r = {}
        t0 = time.perf_counter()
        loaded = load_prompt_cache(str(path))
        mx.eval([x.state for x in loaded])
        r["mlxlm_load_prompt_cache_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        mx.eval([mx.sum(a) for x in loaded for a in x.state if isinstance(a, mx.array)])
        r["mlxlm_first_gpu_pass_s"] = time.perf_counter() - t0
        del loaded
        mx.clear_cache()
        for label, stream in (("gpu", None), ("cpu", mx.cpu)):  # what agentd's v1 loader does, both ways
            t0 = time.perf_counter()
            t = mx.load(str(path), stream=stream)
            mx.eval(list(t.values()))
            r[f"load_{label}_stream_s"] = time.perf_counter() - t0
            h = __import__("hashlib").sha256()
            r[f"load_{label}_stream_host_sha256_s"] = _timed(lambda: [h.update(memoryview(a)) for a in t.values()])
            r[f"load_{label}_stream_first_gpu_pass_s"] = _timed(lambda: mx.eval([a.sum() for a in t.values()]))
            del t
            mx.clear_cache()
        r.update(_read_hash_place(path))
        mx.clear_cache()
        rows.append(r)
    out["runs"] = rows
    out["median"] = {k: c.med([r.get(k) for r in rows]) for k in rows[0] if not isinstance(rows[0][k], (bool, str))}
    return out


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def _read_hash_place(path: Path, threads: int = 8) -> dict:
    """The pieces of a restore: parallel preads into one buffer, each hash at hand (whole,
    and 8 blocks on 8 threads), and three placements: fill arrays MLX allocated on the GPU
    stream in place (what a zero-copy loader does), the same allocated on the CPU stream,
    and numpy first then `mx.array`; each followed by the first GPU pass over the bytes."""
    import hashlib
    from concurrent.futures import ThreadPoolExecutor

    import numpy as np

    import mlx.core as mx

    size = path.stat().st_size // 2**20 * 2**20
    rows = size // 2**20
    pool = ThreadPoolExecutor(threads)
    step = -(-rows // threads) * 2**20

    def fill(buf: np.ndarray) -> None:
        fd = os.open(path, os.O_RDONLY)
        flat = memoryview(buf.reshape(-1))

        def read(i: int) -> None:
            lo, hi = i * step, min(size, (i + 1) * step)
            done = 0
            while lo + done < hi:
                done += os.preadv(fd, [flat[lo + done:hi]], lo + done)

        try:
            list(pool.map(read, range(threads)))
        finally:
            os.close(fd)

    r: dict = {"bytes_used": size}
    host = np.empty((rows, 2**20), dtype=np.uint8)
    r["read_threads_s"] = _timed(lambda: fill(host))
    r["memcpy_s"] = _timed(lambda: host.copy())
    r["sha256_s"] = _timed(lambda: hashlib.sha256(host).digest())
    for mod, fn in (("xxhash", "xxh3_128"), ("blake3", "blake3")):
        try:
            h = getattr(__import__(mod), fn)
        except (ImportError, AttributeError):
            continue
        r[f"{fn}_s"] = _timed(lambda: h(host).digest())
        parts = np.array_split(host, threads)
        r[f"{fn}_8threads_s"] = _timed(lambda: list(pool.map(lambda p: h(p).digest(), parts)))

    def gpu_pass(a) -> None:
        mx.eval(a.sum())

    for label, make in (("gpu_zeros", lambda: mx.zeros((rows, 2**20), dtype=mx.uint8)),
                        ("cpu_zeros", lambda: mx.zeros((rows, 2**20), dtype=mx.uint8, stream=mx.cpu))):
        t0 = time.perf_counter()
        a = make()
        mx.eval(a)
        r[f"{label}_alloc_s"] = time.perf_counter() - t0
        try:
            view = np.asarray(memoryview(a))
            r[f"{label}_writeable"] = bool(view.flags.writeable)
            r[f"{label}_fill_s"] = _timed(lambda: fill(view))
            del view
            r[f"{label}_first_gpu_pass_s"] = _timed(lambda: gpu_pass(a))
            r[f"{label}_gpu_pass_again_s"] = _timed(lambda: gpu_pass(a))
        except (TypeError, ValueError, RuntimeError) as e:
            r[f"{label}_error"] = str(e)
        del a
        mx.clear_cache()
    r.update(_staged_place(path, size, rows, pool, threads))
    t0 = time.perf_counter()
    a = mx.array(host)
    mx.eval(a)
    r["from_numpy_s"] = time.perf_counter() - t0
    r["from_numpy_first_gpu_pass_s"] = _timed(lambda: gpu_pass(a))
    del a
    pool.shutdown()
    return r


def _staged_place(path: Path, size: int, rows: int, pool, threads: int, chunk: int = 32 * 2**20) -> dict:
    """What agentd's restore does on CUDA (agentd.cuda_copy): each thread reads a 32 MiB
    piece into a pinned slot, hashes it there and has the copy engine move it into an array
    MLX zeroed on the GPU; then the first GPU pass (no page faults left to take)."""
    import mlx.core as mx
    import numpy as np
    import xxhash

    from agentd import cuda_copy

    staging = cuda_copy.staging()
    if staging is None:
        return {"staged_error": "no CUDA runtime"}
    r: dict = {}
    r["staged_pin_s"] = _timed(lambda: staging.reserve(chunk, threads))
    a = mx.zeros((rows, 2**20), dtype=mx.uint8)
    mx.eval(a)
    mx.synchronize()
    dst = np.asarray(memoryview(a)).ctypes.data
    fd = os.open(path, os.O_RDONLY)

    def piece(lo: int) -> None:
        n = min(chunk, size - lo)
        slot = staging.take(chunk)
        try:
            buf = memoryview(slot.host[:n])
            done = 0
            while done < n:
                done += os.preadv(fd, [buf[done:]], lo + done)
            xxhash.xxh3_128(buf).digest()
            staging.upload(slot, [(dst + lo, n, 0, n, n, 1)])
        finally:
            staging.give(slot)

    try:
        r["staged_fill_s"] = _timed(lambda: list(pool.map(piece, range(0, size, chunk))))
    finally:
        os.close(fd)
    r["staged_first_gpu_pass_s"] = _timed(lambda: mx.eval(a.sum()))
    del a
    mx.clear_cache()
    return r


def _load_eval(path: Path) -> dict:
    import mlx.core as mx

    t = mx.load(str(path))
    mx.eval(list(t.values()))
    return t


def disk_bandwidth(work: Path, nbytes: int = 2 * 2**30) -> dict:
    """Write+fsync, read with the file dropped from the page cache, and read hot: GB/s."""
    path = work / "disk.bin"
    block = os.urandom(64 * 2**20)
    t0 = time.perf_counter()
    with open(path, "wb") as f:
        for _ in range(nbytes // len(block)):
            f.write(block)
        f.flush()
        os.fsync(f.fileno())
    write_s = time.perf_counter() - t0
    fd = os.open(path, os.O_RDONLY)
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    os.close(fd)
    t0 = time.perf_counter()
    path.read_bytes()
    cold_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    path.read_bytes()
    hot_s = time.perf_counter() - t0
    path.unlink()
    gb = nbytes / 1e9
    return {"bytes": nbytes, "write_fsync_gbps": gb / write_s, "read_dropped_gbps": gb / cold_s, "read_hot_gbps": gb / hot_s}


def split_main(args) -> None:
    models_dir = Path(args.models_dir)
    model_dir = gpu_models.build(args.model, models_dir / args.model)
    work = Path(tempfile.mkdtemp(prefix="split-", dir=args.work))
    import mlx.core as mx

    info = {"device_info": {k: str(v) for k, v in mx.device_info().items()}, "default_device": str(mx.default_device()),
            "cuda": bool(getattr(mx, "cuda", None) and mx.cuda.is_available())}
    data = {"machine": {**c.machine_info(), **gpu_info()}, "mlx": info, "disk": disk_bandwidth(work),
            "split": [restore_split(model_dir, n, work, runs=args.runs) for n in args.contexts]}
    c.write_json(Path(args.out), data)
    print(json.dumps(data["split"], indent=1)[:6000])


def restore_variants(n_tokens: int, work: Path, runs: int = 3) -> dict:
    """agentd's restore code (BlockStore.read_into into RowTarget.fill, as `CacheRepository`
    runs it) on synthetic blocks of llama-8B's layout (32 layers, 8 KV heads of 128, bfloat16;
    128 KiB a token), page cache hot, each way it can place them: staged copies from pinned
    memory (2-D, one per array and block) or through a device buffer, on 8 or 16 threads;
    host writes into the managed arrays; and reading and checking alone (no placement).
    Each timed to the end of the first GPU pass over the restored arrays."""
    from concurrent.futures import ThreadPoolExecutor

    import mlx.core as mx
    import numpy as np

    from agentd import cuda_copy, restore_arrays
    from agentd.blocks import ROOT, BlockStore, chain_ids
    from agentd.kvrows import ArraySpec, RowLayout, row_buffers

    B = 256
    layout = RowLayout(tuple(ArraySpec(layer, 8, 128, "bfloat16") for layer in range(32) for _ in range(2)))
    root = Path(tempfile.mkdtemp(prefix="blocks-", dir=work))
    store = BlockStore(root, "bench", B)
    tokens = list(range(n_tokens // B * B))
    ids = chain_ids("bench", tokens, B)
    parents = [ROOT, *ids[:-1]]
    rng = np.random.default_rng(0)
    piece = [rng.integers(0, 65535, (1, 8, B, 128), dtype=np.uint16) for _ in layout.arrays]
    for i, bid in enumerate(ids):  # random rows, the same for every block (ids differ by tokens)
        store.write(bid, parents[i], tokens[i * B:(i + 1) * B], layout, row_buffers(piece, 0, B), i * B)
    nbytes = layout.row_bytes() * len(tokens)
    real_staging = restore_arrays._cuda_staging

    def restore(threads: int, staging, read_only: bool = False, overlap: bool = True) -> tuple[float, float]:
        restore_arrays._cuda_staging = lambda: staging
        restore_arrays.OVERLAP_ARRAYS = overlap
        t0 = time.perf_counter()
        target = restore_arrays.RowTarget(layout, len(tokens))

        def one(i: int) -> None:
            def read(bufs):
                store.read_into(ids[i], parents[i], tokens[i * B:(i + 1) * B], layout, bufs)
            if read_only:
                slot = staging.take(layout.row_bytes() * B)
                try:
                    read([memoryview(slot.host[:layout.row_bytes() * B])])
                finally:
                    staging.give(slot)
            else:
                target.fill(i * B, (i + 1) * B, read)

        with ThreadPoolExecutor(threads) as pool:  # as CacheRepository._read_blocks runs it
            pending = pool.map(one, range(len(ids)))
            target.allocate()
            list(pending)
        arrays = target.arrays
        t1 = time.perf_counter()
        mx.eval([a.sum() for a in arrays])
        t2 = time.perf_counter()
        exact = read_only or all(  # rows where they belong: first, middle and last block of some arrays
            bool(mx.array_equal(arrays[j][:, :, i * B:(i + 1) * B, :].view(mx.uint16), mx.array(piece[j])))
            for j in (0, 1, len(arrays) // 2, len(arrays) - 1) for i in (0, len(ids) // 2, len(ids) - 1))
        del target, arrays
        mx.clear_cache()
        return t1 - t0, t2 - t1, exact

    pinned = cuda_copy.staging()
    rt = pinned.rt if pinned is not None else None
    variants = {}
    if rt is not None:
        via_dev = cuda_copy.Staging(rt, 16, via_device=True)
        variants = {"pinned_2d_8threads": (8, pinned), "pinned_2d_16threads": (16, pinned),
                    "pinned_2d_16threads_arrays_first": (16, pinned, False, False),
                    "via_device_8threads": (8, via_dev), "via_device_16threads": (16, via_dev),
                    "read_and_check_only_8threads": (8, pinned, True), "read_and_check_only_16threads": (16, pinned, True)}
        pinned.max_slots = 16
    variants["host_writes_8threads"] = (8, None)
    out = {"tokens": len(tokens), "bytes": nbytes}
    for label, (threads, staging, *ro) in variants.items():
        restore(threads, staging, *ro)  # slots pinned, pages in the page cache
        times = [restore(threads, staging, *ro) for _ in range(runs)]
        fill, first = c.med([t[0] for t in times]), c.med([t[1] for t in times])
        out[label] = {"fill_s": fill, "first_gpu_pass_s": first, "gbps": nbytes / (fill + first) / 1e9,
                      "exact": all(t[2] for t in times)}
        c.log(f"restore {len(tokens)} tokens, {label}: {out[label]}")
    restore_arrays._cuda_staging = real_staging
    restore_arrays.OVERLAP_ARRAYS = True
    shutil.rmtree(root, ignore_errors=True)
    return out


def restore_main(args) -> None:
    work = Path(tempfile.mkdtemp(prefix="restore-", dir=args.work))
    data = {"machine": {**c.machine_info(), **gpu_info()},
            "restore": [restore_variants(n, work, runs=args.runs) for n in args.contexts]}
    c.write_json(Path(args.out), data)


# ---- through agentd ----------------------------------------------------------------------


def inproc_main(model_dir: Path, contexts: list[int], decode: int) -> dict:
    """mlx-lm alone, one process: for each context, prefill it (2,048 at a time) and decode
    `decode` greedy tokens."""
    import mlx.core as mx
    from mlx_lm import load
    from mlx_lm.generate import generate_step
    from mlx_lm.models.cache import make_prompt_cache

    model, _ = load(str(model_dir))
    rng = __import__("random").Random(1)
    for _ in range(2):  # kernels loaded and every shape seen once, off the clock
        warm = [rng.randrange(1000) for _ in range(CHUNK + 40)]
        for _tok in zip(range(3), generate_step(mx.array(warm), model, prompt_cache=make_prompt_cache(model))):
            pass
    out = {}
    for n_tokens in contexts:
        prompt = mx.array([rng.randrange(1000) for _ in range(n_tokens)])
        cache = make_prompt_cache(model)
        t0 = time.perf_counter()
        times = []
        for _i, (tok, _lp) in zip(range(decode + 1), generate_step(prompt, model, prompt_cache=cache,
                                                                    prefill_step_size=CHUNK)):
            times.append(time.perf_counter() - t0)
        out[str(n_tokens)] = {"tokens": n_tokens, "ttft_s": times[0], "prefill_tps": n_tokens / times[0],
                              "decode_tps": decode / (times[-1] - times[0])}
        del cache
        mx.clear_cache()
    return out


def _files_under(d: Path) -> list[Path]:
    return [p for p in Path(d).rglob("*") if p.is_file()] if Path(d).exists() else []


def drop_page_cache(d: Path) -> int:
    """Evict a folder's files from the page cache (as after a reboot); returns bytes dropped."""
    total = 0
    for path in _files_under(d):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fdatasync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            total += os.fstat(fd).st_size
        finally:
            os.close(fd)
    return total


def _turn(d: "c.Daemon", name: str, message: str, max_tokens: int, ptx: Path, rebuild: bool = False) -> dict:
    before = len(_files_under(ptx))
    with d.client() as cl:
        r = c.timed_chat(cl, name, message, max_tokens=max_tokens, rebuild=rebuild)
    r["kernels_compiled"] = (len(_files_under(ptx)) - before) // 3  # .cu, .ptx, .txt per kernel
    keep = ("cache_source", "cached_tokens", "prefilled_tokens", "generated_tokens", "prompt_tokens", "restore_ms",
            "ttft_ms", "decode_tokens_per_s", "client_ttft_ms", "client_total_ms", "kernels_compiled")
    return {k: r.get(k) for k in keep}


def _summarize(contexts: dict) -> None:
    for r in contexts.values():
        resumed = [x["ttft_ms"] for x in r["resumed"]]
        res = c.med(resumed[1:] or resumed)
        reb = c.med([x["ttft_ms"] for x in r["rebuilt"]])
        r["summary"] = {"resumed_ttft_ms": res, "rebuilt_ttft_ms": reb,
                        "speedup": reb / res if res and reb else None,
                        "resumed_page_cache_dropped_ttft_ms": resumed[0] if resumed else None}


def bench_model(name: str, args, cache_home: Path, save) -> dict:
    """One model through agentd and in-process; `save(out)` is called after every phase so a
    run cut short by a time limit still leaves what it measured."""
    models_dir = Path(args.models_dir)
    t0 = time.perf_counter()
    subprocess.run([sys.executable, str(Path(__file__).with_name("gpu_models.py")), name, str(models_dir / name)],
                   check=True, timeout=600)
    model_dir = models_dir / name
    out: dict = {"model": name, "config": gpu_models.CONFIGS[name], "build_s": time.perf_counter() - t0,
                 "weights_bytes": (model_dir / "model.safetensors").stat().st_size, "restart_start_s": []}
    # agentd's kernel cache (under XDG_CACHE_HOME) and the driver's: empty on a fresh machine.
    os.environ["XDG_CACHE_HOME"] = str(cache_home)
    os.environ["CUDA_CACHE_PATH"] = str(cache_home / "nv")
    ptx = cache_home / "agentd" / "mlx-ptx"
    home = c.short_tmp("agpu-")
    flags = ["--log-level", "info", "--cache-budget", "200GB", "--max-hot", "32", "--min-available", "1GB",
             "--flush-interval", "3600"] + list(args.daemon_arg or [])
    d = c.Daemon(home, model_dir, *flags)
    tok = c.Tok(model_dir)
    fresh, cached = not _files_under(ptx), len(_files_under(ptx)) // 3
    d.start(timeout=900)
    with d.client() as cl:
        status = cl.status()
    out["first_start"] = {"start_s": d.start_s, "fresh_caches": fresh, "kernels_cached_before": cached,
                          "model": status["model"]}
    c.log(f"{name}: first start {d.start_s:.1f}s, {status['model']}")
    contexts: dict = {}
    out["contexts"] = contexts
    try:
        for n in args.contexts:
            agent = f"a{n}"
            with d.client() as cl:
                cl.create(agent, system=tok.text_of_length(n - 40))
            first = _turn(d, agent, "Here is the incident log. Acknowledge briefly.", 64, ptx)
            contexts[str(n)] = {"first_turn": first, "resumed": [], "rebuilt": []}
            c.log(f"{name} {n}: first turn {first}")
        save(out)
        # In-process mlx-lm on the same machine, kernels already compiled (same cache).
        os.environ["MLX_PTX_CACHE_DIR"] = str(next(iter(ptx.iterdir()), ptx) if ptx.is_dir() else ptx)
        proc = subprocess.run([sys.executable, __file__, "_inproc", str(model_dir),
                               ",".join(map(str, args.contexts)), "64"], capture_output=True, text=True, timeout=600)
        os.environ.pop("MLX_PTX_CACHE_DIR")
        inproc = json.loads(proc.stdout.strip().splitlines()[-1]) if proc.returncode == 0 else {}
        for n in args.contexts:
            contexts[str(n)]["inproc"] = inproc.get(str(n)) or {"error": proc.stderr[-2000:]}
            c.log(f"{name} {n}: in-process {contexts[str(n)]['inproc']}")
        save(out)
        for run in range(args.runs):
            with d.client() as cl:
                for n in args.contexts:
                    cl.fork(f"a{n}", f"r{n}-{run}")
            d.stop()
            dropped = drop_page_cache(home / "data") if run == 0 else 0
            d.start(timeout=900)
            out["restart_start_s"].append(d.start_s)
            for n in args.contexts:
                q = FOLLOW_UPS[run % len(FOLLOW_UPS)]
                res = _turn(d, f"a{n}", q, 8, ptx)
                res["page_cache_dropped_bytes"] = dropped
                # A fork shares its source's blocks: `rebuild` makes it prefill the transcript.
                reb = _turn(d, f"r{n}-{run}", q, 8, ptx, rebuild=True)
                contexts[str(n)]["resumed"].append(res)
                contexts[str(n)]["rebuilt"].append(reb)
                c.log(f"{name} {n} run {run}: resumed {res['ttft_ms']} ms ({res['restore_ms']} restore), "
                      f"rebuilt {reb['ttft_ms']} ms")
            _summarize(contexts)
            save(out)
        out["concurrent"] = concurrent_decode(d, tok, args.agents)
        save(out)
        for n in args.contexts:  # warm restore: evicted and reloaded in the same process
            with d.client() as cl:
                cl.evict(f"a{n}")
            contexts[str(n)]["warm_restore"] = _turn(d, f"a{n}", "One more thing: who owns the fix?", 8, ptx)
        save(out)
    finally:
        out["daemon_log_tail"] = d.stderr()[-30000:]
        save(out)
        d.stop()
    return out


def concurrent_decode(d: "c.Daemon", tok: "c.Tok", counts: list[int], context: int = 512, reply: int = 64) -> list:
    """Aggregate decode for N agents answering at once (the scheduler batches them): each has
    a `context`-token prompt and asks for `reply` tokens; aggregate = all tokens generated
    over the time from the first first-token to the last reply's end, at the client."""
    import threading

    rows = []
    for n in counts:
        names = [f"k{n}-{i}" for i in range(n)]
        with d.client() as cl:
            for i, name in enumerate(names):
                cl.create(name, system=tok.text_of_length(context, seed_sentences=i))
        marks: dict = {}

        def one(name: str) -> None:
            with d.client() as cl:
                t0 = time.perf_counter()
                stream = cl.chat(name, "Summarise the log in detail.", max_tokens=reply, temperature=0.0)
                first = None
                for _piece in stream:
                    first = first or time.perf_counter()
                result = stream.wait()
                marks[name] = (first or t0, time.perf_counter(), result.get("generated_tokens", 0))

        threads = [threading.Thread(target=one, args=(name,)) for name in names]
        for t in threads:
            t.start()
        for t in threads:
            t.join(600)
        firsts, ends, toks = zip(*marks.values())
        span = max(ends) - min(firsts)
        rows.append({"agents": n, "tokens": sum(toks), "span_s": span, "aggregate_tps": sum(toks) / span if span else None})
        c.log(f"concurrent {n}: {rows[-1]}")
    return rows


FOLLOW_UPS = ["In one sentence: what should we check first?", "Which team owns the fix?",
              "What is the single biggest risk now?", "Name one metric to watch."]


def bench_main(args) -> None:
    data = {"machine": {**c.machine_info(), **gpu_info()}, "contexts": args.contexts, "runs": args.runs, "models": {}}
    # agentd's kernel cache, empty at first (a fresh machine), then shared by the models in order.
    cache_home = Path(args.cache_home or tempfile.mkdtemp(prefix="xdg-", dir=args.work))
    for name in args.models.split(","):
        t0 = time.perf_counter()

        def save(partial, name=name, t0=t0):
            data["models"][name] = {**partial, "wall_s": time.perf_counter() - t0}
            c.write_json(Path(args.out), data)

        try:
            bench_model(name, args, cache_home, save)
        except Exception as e:  # keep what the other models measured
            data["models"].setdefault(name, {})["error"] = f"{type(e).__name__}: {e}"
            c.write_json(Path(args.out), data)
    print(summary(data))


def summary(data: dict) -> str:
    rows = []
    for name, m in data["models"].items():
        for n, r in (m.get("contexts") or {}).items():
            s, ip, ft = r.get("summary", {}), r.get("inproc", {}), r["first_turn"]
            rows.append((name, n, c.fmt(ip.get("prefill_tps"), 0), c.fmt(ft["prefilled_tokens"] / ft["ttft_ms"] * 1000, 0),
                         c.fmt(ip.get("decode_tps")), c.fmt(ft["decode_tokens_per_s"]), c.fmt(s.get("resumed_ttft_ms"), 0),
                         c.fmt(s.get("rebuilt_ttft_ms"), 0), c.fmt(s.get("speedup"))))
    return c.table(rows, ("model", "ctx", "prefill mlx-lm", "prefill agentd", "decode mlx-lm", "decode agentd",
                          "resumed ms", "rebuilt ms", "x"))


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "_probe_child":
        model_dir, steps, ptx = Path(sys.argv[2]), json.loads(sys.argv[3]), Path(sys.argv[4])
        print(json.dumps(probe_kernels(model_dir, [tuple(s) for s in steps], ptx)))
        return
    if len(sys.argv) > 1 and sys.argv[1] == "_inproc":
        print(json.dumps(inproc_main(Path(sys.argv[2]), [int(x) for x in sys.argv[3].split(",")], int(sys.argv[4]))))
        return
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("what", nargs="?", default="bench", choices=["bench", "probe", "split", "restore"])
    ap.add_argument("--model", default="llama-8b", help="for probe/split: one of " + ", ".join(gpu_models.CONFIGS))
    ap.add_argument("--models", default="llama-8b,gemma3-12b")
    ap.add_argument("--contexts", default="8192,32768")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--models-dir", default="/tmp/agentd-gpu-models")
    ap.add_argument("--work", default="/tmp")
    ap.add_argument("--agents", default="1,2,4,8", help="agents answering at once, for aggregate decode ('' skips)")
    ap.add_argument("--daemon-arg", action="append", help="an extra argument for agentd (repeatable)")
    ap.add_argument("--cache-home", help="XDG_CACHE_HOME for the daemons [default: a new empty folder]")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", type=Path, help="[default: benchmarks/out/gpu.json, gpu_probe.json, gpu_split.json]")
    args = ap.parse_args()
    args.out = args.out or c.OUT_DIR / (f"{NAME}.json" if args.what == "bench" else f"{NAME}_{args.what}.json")
    args.contexts = [int(x) for x in args.contexts.split(",")]
    args.agents = [int(x) for x in args.agents.split(",") if x]
    if args.what == "probe":
        probe_main(args)
    elif args.what == "split":
        split_main(args)
    elif args.what == "restore":
        restore_main(args)
    else:
        bench_main(args)


if __name__ == "__main__":
    main()
