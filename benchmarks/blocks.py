"""Issue 13: the block store. What a save writes, what sharing a prefix saves, how fast a
fork starts and a cache restores, and what --kv-bits costs in quality.

    .venv/bin/python benchmarks/blocks.py [--quick] [--model DIR] [--sizes 512,1024,...] [--only PARTS]

Parts (all by default; `--only flush,share,fork,restore,kvbits`):
- flush: a real daemon; at each context size one agent is saved, takes a short turn
  (a ~20-token message, 16 tokens of reply) and is saved again: the daemon's `wchar`
  (/proc/PID/io) across that save and its time, against the new tokens' KV bytes and the
  bytes a v1 file (the whole cache) would be. Three turns a size.
- share: six agents created with one ~1,830-token system prompt, each a short turn and a
  save: bytes on disk after each, and how many tokens each prefilled.
- fork: TTFT of a fork of a saved ~3,300-token agent (its blocks) against a fresh agent
  prefilling the same context (rebuilt); interleaved, three runs each.
- restore: in-process `CacheRepository.load` (read + verify + rebuild) of a saved agent,
  its bytes per second against a numpy memory copy of the same bytes, interleaved, with the
  rows read and checked in C (readhash) and in Python alternately; then the first load in
  new processes (as after a restart), plain, with glibc's hugetlb tunable (transparent huge
  pages for malloc) and after the start's restore reserve.
- kvbits: unquantized vs --kv-bits 8 and 4 (group 64): bytes per token, greedy agreement
  on fixed prompts, perplexity on a fixed text (README.md as of commit 757017b).
Writes benchmarks/out/blocks.json.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from agentd import blas  # noqa: E402

blas.maybe_reexec_with_fast_blas()

import argparse  # noqa: E402
import math  # noqa: E402
import subprocess  # noqa: E402
import time  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as c  # noqa: E402

NAME = "blocks"
FLUSH_SIZES = [512, 1024, 2048, 3300, 4096, 8192]
QUICK_FLUSH_SIZES = [64, 160]
TURN = "Thanks. Now list the two most likely root causes, briefly, in order."
PROMPTS = [
    "Explain in three sentences why a payment API might return a 500 error.",
    "Write a short haiku about databases.",
    "What is the capital of France? Answer and then explain its history briefly.",
    "List five steps to debug a slow web page.",
    "Summarize the benefits of unit testing for a junior developer.",
    "Describe how a hash table works.",
]


def wchar(pid: int) -> int:
    for line in Path(f"/proc/{pid}/io").read_text().splitlines():
        if line.startswith("wchar:"):
            return int(line.split()[1])
    raise RuntimeError("no wchar")


def disk_bytes(home: Path) -> int:
    caches = home / "data" / "caches"
    return sum(p.stat().st_size for p in caches.rglob("*") if p.is_file() and "quarantine" not in p.parts)


def tokens_of(client, name: str) -> int:
    return client.show(name)["agent"]["tokens"]


def row_bytes_of(model: Path) -> int:
    """KV bytes per token of the model's full-attention layers (what a block stores per token)."""
    import json

    cfg = json.loads((model / "config.json").read_text())
    heads = cfg.get("num_key_value_heads", cfg["num_attention_heads"])
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    return cfg["num_hidden_layers"] * 2 * heads * head_dim * 4  # float32 on the CPU path


# ---- flush bytes and time vs context -----------------------------------------------------


def part_flush(model: Path, tok: c.Tok, sizes: list[int], turns: int) -> dict:
    home = c.short_tmp("adb-bf-")
    row = row_bytes_of(model)
    out = []
    with c.Daemon(home, model, "--flush-interval", "3600", "--idle-timeout", "3600") as d, d.client() as cl:
        for size in sizes:
            name = f"ctx{size}"
            cl.create(name, system=c.system_prompt(tok, size))
            c.timed_chat(cl, name, "Hello.", max_tokens=8)
            cl.save(name)
            for t in range(turns):
                before_tokens = tokens_of(cl, name)
                c.timed_chat(cl, name, f"{TURN} ({t})", max_tokens=16)
                after_tokens = tokens_of(cl, name)
                w0, t0 = wchar(d.pid), time.perf_counter()
                cl.save(name)
                save_ms = (time.perf_counter() - t0) * 1000
                written = wchar(d.pid) - w0
                new_kv = max(1, after_tokens - before_tokens) * row
                out.append({"size": size, "turn": t, "tokens": after_tokens, "new_tokens": after_tokens - before_tokens,
                            "wchar": written, "new_kv_bytes": new_kv, "ratio": written / new_kv,
                            "v1_bytes": after_tokens * row, "save_ms": save_ms})
                c.log(f"flush {size}: {after_tokens} tokens, +{after_tokens - before_tokens}, wrote {written:,} B "
                      f"({written / new_kv:.2f}x the new KV), {save_ms:.1f} ms")
    return {"row_bytes": row, "points": out}


# ---- sharing a system prompt -------------------------------------------------------------


def part_share(model: Path, tok: c.Tok, system_tokens: int, agents: int) -> dict:
    home = c.short_tmp("adb-bs-")
    row = row_bytes_of(model)
    system = c.system_prompt(tok, system_tokens)
    out = []
    with c.Daemon(home, model, "--flush-interval", "3600", "--idle-timeout", "3600") as d, d.client() as cl:
        for i in range(agents):
            name = f"agent{i + 1}"
            cl.create(name, system=system)
            r = c.timed_chat(cl, name, f"I am user {i + 1}. {TURN}", max_tokens=16)
            cl.save(name)
            out.append({"agent": i + 1, "prefilled": r["prefilled_tokens"], "cached": r["cached_tokens"],
                        "tokens": tokens_of(cl, name), "disk_bytes": disk_bytes(home),
                        "ttft_ms": r["ttft_ms"], "store": cl.status()["store"]})
            c.log(f"share: agent {i + 1} prefilled {r['prefilled_tokens']}, disk {disk_bytes(home):,} B")
    one = out[0]["tokens"] * row
    return {"row_bytes": row, "system_tokens": system_tokens, "one_agent_kv_bytes": one, "points": out,
            "ratio_all": out[-1]["disk_bytes"] / one}


# ---- fork TTFT ---------------------------------------------------------------------------


def part_fork(model: Path, tok: c.Tok, size: int, runs: int) -> dict:
    system = c.system_prompt(tok, size)
    fork_ms, rebuilt_ms, details = [], [], []
    home_a, home_b = c.short_tmp("adb-bk-"), c.short_tmp("adb-bk-")
    with c.Daemon(home_a, model, "--flush-interval", "3600", "--idle-timeout", "3600") as da, da.client() as ca:
        ca.create("source", system=system)
        c.timed_chat(ca, "source", "Hello.", max_tokens=8)
        ca.save("source")
        with c.Daemon(home_b, model, "--flush-interval", "3600", "--idle-timeout", "3600") as db, db.client() as cb:
            for i in range(runs):
                t0 = time.perf_counter()
                ca.fork("source", f"fork{i}")
                fork_op_ms = (time.perf_counter() - t0) * 1000
                f = c.timed_chat(ca, f"fork{i}", TURN, max_tokens=8)
                cb.create(f"fresh{i}", system=system)  # no blocks in this home: a full prefill
                r = c.timed_chat(cb, f"fresh{i}", TURN, max_tokens=8)
                fork_ms.append(f["client_ttft_ms"] + fork_op_ms)
                rebuilt_ms.append(r["client_ttft_ms"])
                details.append({"fork": f, "fork_op_ms": fork_op_ms, "rebuilt": r})
                c.log(f"fork: {f['client_ttft_ms'] + fork_op_ms:.0f} ms ({f['cache_source']}, prefilled "
                      f"{f['prefilled_tokens']}) vs rebuilt {r['client_ttft_ms']:.0f} ms ({r['prefilled_tokens']})")
    return {"size": size, "fork_ttft_ms": fork_ms, "rebuilt_ttft_ms": rebuilt_ms, "runs": details,
            "fork_ms_median": c.med(fork_ms), "rebuilt_ms_median": c.med(rebuilt_ms)}


# ---- restore bandwidth -------------------------------------------------------------------


def part_restore(model: Path, tok: c.Tok, size: int, runs: int) -> dict:
    import numpy as np

    from agentd.agents import AgentStore
    from agentd.cachefile import cache_nbytes
    from agentd.engine import Engine
    from _build import speed_up

    engine = Engine(model)
    speed_up(engine)
    home = c.short_tmp("adb-br-")
    store = AgentStore(home, engine)
    store.create("r", system=c.system_prompt(tok, size))
    store.warm("r")
    store.evict("r")
    loaded = store.repo.load("r")
    n_bytes = len(loaded.tokens) * store.repo._layout.row_bytes()
    src = np.ones(n_bytes, dtype=np.uint8)
    dst = np.empty_like(src)
    np.copyto(dst, src)  # fault the pages in first: a copy into fresh pages measures the kernel
    from agentd import readhash, restore_arrays

    native = readhash.load() is not None
    load_s, python_s, copy_s, fresh_s = [], [], [], []
    for _ in range(runs):
        # The C read (readhash) and the Python one alternate in this process: their ratio is
        # taken in one run.
        for in_c, times in ((True, load_s), (False, python_s)):
            restore_arrays.NATIVE_READS = in_c and native
            loaded = None
            t0 = time.perf_counter()
            loaded = store.repo.load("r")
            times.append(time.perf_counter() - t0)
        restore_arrays.NATIVE_READS = True
        t0 = time.perf_counter()
        np.copyto(dst, src)
        copy_s.append(time.perf_counter() - t0)
        # A restore must also fault in the cache's new pages; so does a copy into new memory.
        t0 = time.perf_counter()
        fresh = np.empty_like(src)
        np.copyto(fresh, src)
        fresh_s.append(time.perf_counter() - t0)
        del fresh
    assert len(loaded.tokens) * store.repo._layout.row_bytes() == n_bytes
    restore_gbs, copy_gbs = n_bytes / c.med(load_s) / 1e9, n_bytes / c.med(copy_s) / 1e9
    fresh_gbs = n_bytes / c.med(fresh_s) / 1e9
    python_gbs = n_bytes / c.med(python_s) / 1e9
    c.log(f"restore {len(loaded.tokens)} tokens, {n_bytes / 2**20:.0f} MiB: {restore_gbs:.2f} GB/s "
          f"({'read in C' if native else 'no C compiler: read in Python'}), memcpy {copy_gbs:.2f} GB/s "
          f"({restore_gbs / copy_gbs:.0%}), into new memory {fresh_gbs:.2f} GB/s; read in Python "
          f"{python_gbs:.2f} GB/s ({python_gbs / copy_gbs:.0%})")
    floor = read_floor(store, "r", runs)
    c.log(f"floor: preadv of the files into touched memory {floor['preadv_gb_s']:.2f} GB/s (1 thread), "
          f"{floor['preadv_threads_gb_s']:.2f} GB/s (2 threads); xxh3 {floor['xxh3_gb_s']:.2f} GB/s")
    store.close()
    first = {label: [first_restore(home, model, env) for _ in range(runs)] for label, env in FIRST_RESTORE_ENVS}
    for label, pts in first.items():
        c.log(f"first restore in a new process ({label}): {c.med([p['load_s'] for p in pts]) * 1000:.1f} ms, "
              f"memcpy there {n_bytes / c.med([p['copy_s'] for p in pts]) / 1e9:.2f} GB/s")
    return {"tokens": len(loaded.tokens), "kv_bytes": n_bytes, "cache_nbytes": cache_nbytes(loaded.cache),
            "load_s": load_s, "read_in_c": native, "python_load_s": python_s, "python_ratio": python_gbs / copy_gbs,
            "copy_s": copy_s, "fresh_copy_s": fresh_s, "restore_gb_s": restore_gbs,
            "memcpy_gb_s": copy_gbs, "memcpy_fresh_gb_s": fresh_gbs, "ratio": restore_gbs / copy_gbs,
            "ratio_fresh": restore_gbs / fresh_gbs, "first_restore": first, "floor": floor}


def read_floor(store, name: str, runs: int) -> dict:
    """What a restore cannot beat: the agent's block and tail files read from the page cache
    into memory already touched (one file after another, and on two threads), and xxh3 over
    those bytes, each a median of `runs`."""
    import os
    from concurrent.futures import ThreadPoolExecutor

    import numpy as np
    import xxhash

    repo = store.repo
    m = repo._manifests[name]
    files = [repo.blocks.path(b) for b in m["blocks"]] + ([repo.agent_dir(name) / m["tail"]["file"]] if m["tail"] else [])
    bufs = [np.ones(p.stat().st_size, dtype=np.uint8) for p in files]
    total = sum(b.nbytes for b in bufs)

    def read(i: int) -> None:
        fd = os.open(files[i], os.O_RDONLY)
        try:
            os.preadv(fd, [memoryview(bufs[i])], 0)
        finally:
            os.close(fd)

    def timed(fn) -> float:
        ts = []
        for _ in range(runs):
            t0 = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t0)
        return total / c.med(ts) / 1e9

    one = timed(lambda: [read(i) for i in range(len(files))])
    with ThreadPoolExecutor(2) as pool:
        two = timed(lambda: list(pool.map(read, range(len(files)))))
    xx = timed(lambda: [xxhash.xxh3_128(b).digest() for b in bufs])
    return {"bytes": total, "files": len(files), "preadv_gb_s": one, "preadv_threads_gb_s": two, "xxh3_gb_s": xx}


# A restore right after a start (the daemon's common case) gets all-new memory: its page
# faults are most of the cost of the arrays. glibc's hugetlb tunable makes malloc ask for
# transparent huge pages (THP is `madvise` on this machine), 512x fewer faults.
# The daemon's start makes the memory of the next restores ready (`reserve_restores`): the
# third variant does what it does first.
FIRST_RESTORE_ENVS = [("plain", {}), ("GLIBC_TUNABLES=glibc.malloc.hugetlb=1", {"GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"}),
                      ("the start's restore reserve", {"BENCH_RESERVE": "1"})]

FIRST_RESTORE = """
import json, os, sys, time
from pathlib import Path
sys.path.insert(0, sys.argv[3])
import numpy as np
from agentd.agents import AgentStore
from agentd.engine import Engine
from _build import speed_up
engine = Engine(Path(sys.argv[2]))
speed_up(engine)
store = AgentStore(Path(sys.argv[1]), engine)
from agentd.restore_arrays import host_read_usable, native_reader
if host_read_usable():
    native_reader()  # as the daemon's start does (cli): the C reader is loaded before any restore
if os.environ.get("BENCH_RESERVE"):
    from agentd.restore_reads import reserve_restores
    reserve_restores([store.repo.restore_rows("r")], 1 << 40)
t0 = time.perf_counter()
loaded = store.repo.load("r")
load_s = time.perf_counter() - t0
n = len(loaded.tokens) * store.repo._layout.row_bytes()
src = np.ones(n, dtype=np.uint8)
dst = np.empty_like(src)
np.copyto(dst, src)
t0 = time.perf_counter()
np.copyto(dst, src)
print(json.dumps({"load_s": load_s, "copy_s": time.perf_counter() - t0, "tokens": len(loaded.tokens)}))
"""


def first_restore(home: Path, model: Path, env: dict) -> dict:
    """The first `load` in a new process (files in the page cache), and a memcpy there."""
    import json
    import os

    out = subprocess.run([sys.executable, "-c", FIRST_RESTORE, str(home), str(model), str(Path(__file__).parent)],
                         capture_output=True, text=True, check=True, env={**os.environ, **env})
    return json.loads(out.stdout.strip().splitlines()[-1])


# ---- KV quantization: bytes and quality --------------------------------------------------


def fixed_text() -> str:
    try:
        return subprocess.run(["git", "show", "757017b:README.md"], capture_output=True, text=True,
                              cwd=str(c.ROOT), check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return (c.ROOT / "README.md").read_text()


def perplexity(engine, ids: list[int], chunk: int = 256) -> float:
    """Teacher-forced, through the engine's own cache kind, `chunk` tokens at a time."""
    import mlx.core as mx

    cache = engine.new_cache()
    nll, count = 0.0, 0
    for lo in range(0, len(ids) - 1, chunk):
        x = ids[lo:min(lo + chunk, len(ids) - 1)]
        y = mx.array(ids[lo + 1:lo + 1 + len(x)])
        logits = engine.model(mx.array(x)[None], cache=cache)[0].astype(mx.float32)
        logp = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        nll -= mx.take_along_axis(logp, y[:, None], axis=-1).sum().item()
        count += len(x)
    return math.exp(nll / count)


def greedy(engine, prompt: str, n: int) -> list[int]:
    import mlx.core as mx

    ids = engine.render("", [{"role": "user", "content": prompt}])
    cache = engine.new_cache()
    logits = engine.model(mx.array(ids)[None], cache=cache)[:, -1, :]
    out = []
    for _ in range(n):
        t = int(mx.argmax(logits, axis=-1).item())
        out.append(t)
        if t in engine.eos_ids:
            break
        logits = engine.model(mx.array([[t]]), cache=cache)[:, -1, :]
    return out


def part_kvbits(model: Path, n_tokens: int, text_tokens: int) -> dict:
    from agentd.engine import Engine
    from agentd.kvrows import layout_of
    from _build import speed_up

    rows = []
    reference = None
    for bits in (None, 8, 4):
        engine = Engine(model, kv_bits=bits, kv_group_size=64)
        speed_up(engine)
        ids = engine.tokenizer.encode(fixed_text())[:text_tokens]
        try:
            ppl = perplexity(engine, ids)
        except ValueError as e:  # mlx quantizes groups of 32+: a tiny test model's heads are smaller
            rows.append({"bits": bits, "error": str(e)})
            continue
        answers = [greedy(engine, p, n_tokens) for p in PROMPTS]
        cache = engine.new_cache()
        import mlx.core as mx

        engine.model(mx.array([[1, 2, 3, 4]]), cache=cache)
        per_token = layout_of(cache).row_bytes()
        if reference is None:
            reference = answers
        same = sum(a == r for a, r in zip(answers, reference))
        pos = [sum(x == y for x, y in zip(a, r)) / max(len(r), 1) for a, r in zip(answers, reference)]
        first_diff = [next((i for i, (x, y) in enumerate(zip(a, r)) if x != y), None) for a, r in zip(answers, reference)]
        rows.append({"bits": bits, "bytes_per_token": per_token, "perplexity": ppl, "identical_answers": same,
                     "prompts": len(PROMPTS), "positionwise_agreement": sum(pos) / len(pos),
                     "first_difference": first_diff, "text_tokens": len(ids)})
        c.log(f"kv-bits {bits}: {per_token} B/token, ppl {ppl:.3f}, {same}/{len(PROMPTS)} identical")
    return {"group_size": 64, "answer_tokens": n_tokens, "rows": rows}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny sizes, one run: a smoke test")
    ap.add_argument("--model", help="an mlx-lm model folder [default: the default model]")
    ap.add_argument("--sizes", help="comma-separated context sizes for the flush part")
    ap.add_argument("--only", help="comma-separated parts: flush,share,fork,restore,kvbits")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--fork-size", type=int, default=3300)
    ap.add_argument("--restore-size", type=int, default=8192)
    ap.add_argument("--out", type=Path, default=c.OUT_DIR / f"{NAME}.json")
    args = ap.parse_args()
    parts = args.only.split(",") if args.only else ["flush", "share", "fork", "restore", "kvbits"]
    model = c.resolve_model(args.model)
    tok = c.Tok(model)
    q = args.quick
    sizes = [int(s) for s in args.sizes.split(",")] if args.sizes else (QUICK_FLUSH_SIZES if q else FLUSH_SIZES)
    data = {"model": model.name, "machine": c.machine_info(), "loadavg_start": Path("/proc/loadavg").read_text().split()[:3]}
    t0 = time.perf_counter()
    if "flush" in parts:
        data["flush"] = part_flush(model, tok, sizes, 1 if q else 3)
    if "share" in parts:
        data["share"] = part_share(model, tok, 300 if q else 1830, 3 if q else 6)
    if "fork" in parts:
        data["fork"] = part_fork(model, tok, 300 if q else args.fork_size, 1 if q else 3)
    if "restore" in parts:
        data["restore"] = part_restore(model, tok, 300 if q else args.restore_size, 1 if q else args.runs)
    if "kvbits" in parts:
        data["kvbits"] = part_kvbits(model, 8 if q else 48, 128 if q else 2048)
    data["total_s"] = time.perf_counter() - t0
    data["loadavg_end"] = Path("/proc/loadavg").read_text().split()[:3]
    this = [Path(sys.argv[0]).name, *sys.argv[1:]]
    if args.only and args.out.exists():  # a run of some parts adds them to the file's others
        import json

        old = json.loads(args.out.read_text())
        old.pop("when", None)  # write_json stamps this run's time
        data = {**old, **data, "commands": [*old.get("commands", []), this]}
    else:
        data["commands"] = [this]
    c.write_json(args.out, data)


if __name__ == "__main__":
    main()
