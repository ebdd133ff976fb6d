"""Issue 5, question 1: how long does saving and loading an agent's KV cache take, and how
many bytes per token does it cost, as the conversation grows?

    .venv/bin/python benchmarks/save_load.py [--quick] [--model DIR] [--sizes 256,512,...] [--runs N]

In-process, through `agentd.agents.AgentStore` exactly as the daemon's worker uses it: one
agent's conversation grows through each size (a long system prompt, then turns appended to
its record; `AgentStore.warm` prefills only what is new), and at each size the cache is
saved (`AgentStore.save`: encode, checksum, write a `.partial`, fsync, rename, fsync the
directory) and loaded back (`AgentStore.acquire` of the evicted agent: read, verify the
checksum, rebuild the cache objects). Loads are timed twice: with the file in the page
cache (just written, the common case) and after `posix_fadvise(DONTNEED)` drops its pages
(a cold read from the device). Prints medians and the headline: load time per 1k tokens
against the prefill it replaces (the prefill rate is that of the daemon's CPU path: if the
engine left the model quantized, `agentd.device.prepare_for_device` is applied here first,
as benchmarks/_build.py does, so building 8k tokens takes minutes, not a quarter hour; the
cache arrays have the same dtype and shapes either way). Writes benchmarks/out/save_load.json.
"""

from __future__ import annotations

# The fast BLAS is preloaded by re-exec, so this must run before anything imports mlx.
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from agentd import blas  # noqa: E402

blas.maybe_reexec_with_fast_blas()

import argparse  # noqa: E402
import os  # noqa: E402
import time  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as c  # noqa: E402

NAME = "save_load"


def drop_page_cache(path: Path) -> bool:
    """Evict one file's pages (not the whole system's): the next read goes to the device."""
    if not hasattr(os, "posix_fadvise"):
        return False
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        return True
    finally:
        os.close(fd)


def stored_files(store, name: str) -> list[Path]:
    """Every file the agent's stored cache consists of: manifest, blocks, tail (or one v1 file)."""
    import json

    path = store.cache_path(name)
    if path.name != "manifest.json":
        return [path]
    m = json.loads(path.read_text())
    files = [path] + [store.repo.blocks.path(b) for b in m["blocks"]]
    return files + [path.parent / part["file"] for part in (m["tail"], m["window"]) if part]


def grow_to(store, engine, name: str, target: int, turn: int) -> None:
    """Append one user/assistant turn bringing the rendered conversation to about `target`."""
    rec = store.records.get(name)
    current = len(engine.render(rec.system, rec.messages, add_generation_prompt=False))
    need = target - current - 10  # two role headers
    if need <= 4:
        return
    tok = engine.tokenizer
    text = c.filler(need // 4 + 16 + turn)
    ids = tok.encode(text, add_special_tokens=False)
    while len(ids) < need:
        text += " " + text
        ids = tok.encode(text, add_special_tokens=False)
    user = tok.decode(ids[: need // 3])
    reply = tok.decode(ids[need // 3 : need])
    store.records.append_turn(name, user, reply)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help=f"sizes {c.QUICK_SIZES}, 1 run: a smoke test")
    ap.add_argument("--model", help="an mlx-lm model folder [default: the default model]")
    ap.add_argument("--sizes", help="comma-separated context sizes in tokens")
    ap.add_argument("--runs", type=int, default=5, help="timed saves and loads per size (median)")
    ap.add_argument("--out", type=Path, default=c.OUT_DIR / f"{NAME}.json")
    args = ap.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")] if args.sizes else (c.QUICK_SIZES if args.quick else c.SIZES)
    runs = 1 if args.quick else args.runs

    from agentd.agents import AgentStore
    from agentd.engine import Engine

    t_start = time.perf_counter()
    model = c.resolve_model(args.model)
    engine = Engine(model)
    from _build import speed_up

    prefill_path = speed_up(engine)  # only builds the contexts faster; the saved arrays are the same kind
    home = c.short_tmp("adb-sl-")
    store = AgentStore(home, engine)
    name = "grower"
    tok = c.Tok(model)
    store.create(name, role="benchmark", system=c.system_prompt(tok, sizes[0]))
    c.log(f"model {engine.model_id} ({engine.dtype}), BLAS {blas.mlx_blas()}, speed-up {prefill_path}, home {home}")

    rows, results = [], []
    for i, size in enumerate(sizes):
        if i:
            grow_to(store, engine, name, size, i)
        t0 = time.perf_counter()
        store.warm(name)
        agent = store._hot[name]
        n_tok = len(agent.tokens)
        prefill_s = time.perf_counter() - t0
        prefilled = n_tok - (results[-1]["tokens"] if results else 0)

        save_ms, warm_ms, cold_ms, sizes_b = [], [], [], []
        for _ in range(runs):
            agent = store._hot[name]
            agent.dirty = True  # the same cache written again, as a flush after a turn would
            t0 = time.perf_counter()
            assert store.save(name)
            save_ms.append((time.perf_counter() - t0) * 1000)
            sizes_b.append(sum(f.stat().st_size for f in stored_files(store, name)))
            for cold, into in ((False, warm_ms), (True, cold_ms)):
                store.evict(name)  # clean: dropped without a write
                if cold and not all([drop_page_cache(f) for f in stored_files(store, name)]):
                    continue
                agent, source, restore_ms = store.acquire(name)
                assert source == "disk" and len(agent.tokens) == n_tok, (source, len(agent.tokens))
                into.append(restore_ms)
        file_bytes = sizes_b[-1]
        r = {
            "target": size,
            "tokens": n_tok,
            "file_bytes": file_bytes,
            "cache_nbytes": store._hot[name].nbytes,
            "bytes_per_token": file_bytes / n_tok,
            "save_ms": save_ms,
            "load_ms": warm_ms,
            "load_cold_ms": cold_ms,
            "save_ms_median": c.med(save_ms),
            "load_ms_median": c.med(warm_ms),
            "load_cold_ms_median": c.med(cold_ms),
            "prefill_s": prefill_s,
            "prefilled_tokens": prefilled,
            "prefill_tok_s": prefilled / prefill_s if prefill_s > 0 else None,
        }
        results.append(r)
        c.log(f"{n_tok} tokens: save {c.fmt(r['save_ms_median'])} ms, load {c.fmt(r['load_ms_median'])} ms "
              f"(cold {c.fmt(r['load_cold_ms_median'])}), {file_bytes / 2**20:.1f} MiB; "
              f"prefilled {prefilled} in {prefill_s:.1f} s")
        rows.append((n_tok, c.fmt(r["save_ms_median"]), c.fmt(r["load_ms_median"]), c.fmt(r["load_cold_ms_median"]),
                     f"{file_bytes / 2**20:.2f}", f"{r['bytes_per_token']:,.0f}",
                     c.fmt(r["prefill_tok_s"], 0)))
    store.close()
    c.rmtree(home)

    # Headline: at the largest size, loading against prefilling the same tokens. The growth
    # steps prefilled them in chunks onto one cache, which costs what one long prefill costs.
    last = results[-1]
    prefill_all_s = sum(r["prefill_s"] for r in results)
    ratio = prefill_all_s * 1000 / last["load_ms_median"] if last["load_ms_median"] else None
    print()
    print(c.table(rows, ("tokens", "save ms", "load ms", "load cold ms", "file MiB", "bytes/token", "prefill tok/s")))
    print(f"\nmedian of {runs} run(s) per size; save includes fsync of the file and its directory; "
          f"model {engine.model_id}, KV dtype {engine.dtype}, BLAS {blas.mlx_blas()}")
    print(f"headline: at {last['tokens']} tokens, loading takes {last['load_ms_median']:.0f} ms "
          f"({c.fmt(last['load_cold_ms_median'], 0)} ms cold) against {prefill_all_s:.1f} s to prefill them: "
          f"{c.fmt(ratio, 0)}x; save {last['save_ms_median']:.0f} ms, {last['bytes_per_token']:,.0f} bytes per token "
          f"({time.perf_counter() - t_start:.0f} s)")
    c.write_json(args.out, {
        "model": engine.model_id,
        "model_dir": str(model),
        "dtype": engine.dtype,
        "blas": blas.mlx_blas(),
        "prefill_path": prefill_path,
        "runs": runs,
        "sizes": results,
        "headline": {"tokens": last["tokens"], "load_ms": last["load_ms_median"], "prefill_s": prefill_all_s,
                     "load_vs_prefill": ratio, "bytes_per_token": last["bytes_per_token"]},
        "machine": c.machine_info(),
        "elapsed_s": time.perf_counter() - t_start,
    })


if __name__ == "__main__":
    main()
