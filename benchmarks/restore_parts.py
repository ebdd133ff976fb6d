"""Issue 13: where a block-store restore's time goes on the CPU, and what does not help.

    .venv/bin/python benchmarks/restore_parts.py [--size 2048] [--runs 9] [--rounds 3] [--model DIR]

Saves one agent of `--size` tokens (in-process, as benchmarks/blocks.py's restore part),
then, each in a new process on the same files (in the page cache), times `runs` loads
interleaved with a numpy copy of the same bytes, for each variant: plain; glibc's hugetlb
tunable (malloc asks for transparent huge pages); MLX's buffer cache raised to 512 MiB (a
restore may take the buffers the previous one freed); 1, 2 and 8 read threads; all of
them one after another, `rounds` times. And, in
this process, what making the arrays costs: 60 arrays of the cache's shape from `mx.zeros`
and from `mx.empty`, into new memory (cache limit 0) and into reused buffers, and whether
`mx.empty` leaves a reused buffer's old bytes (it does not: it zero-fills too).
Writes benchmarks/out/restore_parts.json.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from agentd import blas  # noqa: E402

blas.maybe_reexec_with_fast_blas()

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import subprocess  # noqa: E402
import time  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as c  # noqa: E402

VARIANTS = [
    ("plain", {}),
    ("glibc.malloc.hugetlb=1", {"GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"}),
    ("MLX cache limit 512 MiB", {"RESTORE_CACHE_LIMIT_MB": "512"}),
    ("1 read thread", {"AGENTD_READ_THREADS": "1"}),
    ("2 read threads", {"AGENTD_READ_THREADS": "2"}),
    ("8 read threads", {"AGENTD_READ_THREADS": "8"}),
]

LOADS = """
import json, os, statistics, sys, time
from pathlib import Path
sys.path.insert(0, sys.argv[3])
import mlx.core as mx
import numpy as np
from agentd.agents import AgentStore
from agentd.engine import Engine
from _build import speed_up
if os.environ.get("RESTORE_CACHE_LIMIT_MB"):
    mx.set_cache_limit(int(os.environ["RESTORE_CACHE_LIMIT_MB"]) << 20)
engine = Engine(Path(sys.argv[2]))
speed_up(engine)
repo = AgentStore(Path(sys.argv[1]), engine).repo
loaded = repo.load("r")
n = len(loaded.tokens) * repo._layout.row_bytes()
src = np.ones(n, dtype=np.uint8)
dst = np.empty_like(src)
np.copyto(dst, src)
load_s, copy_s = [], []
for _ in range(int(sys.argv[4])):
    loaded = None
    t0 = time.perf_counter()
    loaded = repo.load("r")
    load_s.append(time.perf_counter() - t0)
    t0 = time.perf_counter()
    np.copyto(dst, src)
    copy_s.append(time.perf_counter() - t0)
print(json.dumps({"bytes": n, "load_s": load_s, "copy_s": copy_s}))
"""


def arrays_part(layout, n_tokens: int, runs: int) -> dict:
    import mlx.core as mx
    import numpy as np

    shapes = [((1, s.heads, -(-n_tokens // 256) * 256, s.width), getattr(mx, s.dtype)) for s in layout.arrays]

    def make(fn) -> float:
        ts = []
        for _ in range(runs):
            t0 = time.perf_counter()
            a = [fn(shape, dtype=dt) for shape, dt in shapes]
            mx.eval(a)
            ts.append(time.perf_counter() - t0)
            del a
        return c.med(ts)

    out = {}
    previous = mx.set_cache_limit(0)
    out["zeros_new_memory_s"], out["empty_new_memory_s"] = make(mx.zeros), make(mx.empty)
    mx.set_cache_limit(1 << 34)
    out["zeros_reused_s"], out["empty_reused_s"] = make(mx.zeros), make(mx.empty)
    full = [mx.full(shape, 42, dtype=dt) for shape, dt in shapes]
    mx.eval(full)
    del full
    again = [mx.empty(shape, dtype=dt) for shape, dt in shapes]
    mx.eval(again)
    out["empty_keeps_old_bytes"] = bool(any(np.asarray(memoryview(a.view(mx.uint8) if a.dtype == mx.bfloat16 else a)).any()
                                            for a in again))
    del again
    mx.clear_cache()
    mx.set_cache_limit(previous)
    out["arrays"] = len(shapes)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=2048)
    ap.add_argument("--runs", type=int, default=9)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--model", help="an mlx-lm model folder [default: the default model]")
    ap.add_argument("--out", type=Path, default=c.OUT_DIR / "restore_parts.json")
    args = ap.parse_args()
    model = c.resolve_model(args.model)
    from agentd.agents import AgentStore
    from agentd.engine import Engine
    from _build import speed_up

    engine = Engine(model)
    speed_up(engine)
    home = c.short_tmp("adb-rp-")
    store = AgentStore(home, engine)
    store.create("r", system=c.system_prompt(c.Tok(model), args.size))
    store.warm("r")
    store.evict("r")
    layout, n_tokens = store.repo._layout, store.repo._manifests["r"]["n_tokens"]
    store.close()
    data = {"model": model.name, "machine": c.machine_info(), "size": args.size, "tokens": n_tokens,
            "loadavg_start": Path("/proc/loadavg").read_text().split()[:3]}
    data["arrays"] = arrays_part(layout, n_tokens, args.runs)
    c.log(f"arrays: {data['arrays']}")
    data["variants"] = {label: [] for label, _ in VARIANTS}
    for round_ in range(args.rounds):  # the variants one after another, `rounds` times: the machine's noise shows
        for label, env in VARIANTS:
            out = subprocess.run([sys.executable, "-c", LOADS, str(home), str(model), str(Path(__file__).parent),
                                  str(args.runs)], capture_output=True, text=True, check=True, env={**os.environ, **env})
            r = json.loads(out.stdout.strip().splitlines()[-1])
            load, copy = c.med(r["load_s"]), c.med(r["copy_s"])
            r.update(load_ms=load * 1000, restore_gb_s=r["bytes"] / load / 1e9, memcpy_gb_s=r["bytes"] / copy / 1e9,
                     ratio=copy / load)
            data["variants"][label].append(r)
            c.log(f"round {round_ + 1}, {label}: restore {load * 1000:.1f} ms, {r['restore_gb_s']:.2f} GB/s, memcpy "
                  f"{r['memcpy_gb_s']:.2f} GB/s ({r['ratio']:.0%})")
    data["loadavg_end"] = Path("/proc/loadavg").read_text().split()[:3]
    c.write_json(args.out, data)


if __name__ == "__main__":
    main()
