"""Issue 14: how long do exporting and importing an agent take, and how big is the bundle?

    .venv/bin/python benchmarks/portable.py [--quick] [--model DIR] [--sizes 1024,8192] [--runs N]

Two real daemons on the same model, homes A and B. At each size an agent with a system
prompt of about that many tokens is built in A (`_build.py`: prefilled and saved, as the
daemon saves it). Then, `--runs` times, interleaved: export from A through `Client.export`
(what `agentctl export -o FILE` does: chunk frames written to a file, size and SHA-256
checked) and import of that file into B under a new name through `Client.import_` (the
upload, the daemon's checks, the cache decoded and saved to B's disk). The first export
finds the agent cold (its cache is loaded from A's disk first); later ones find it hot.
Once per size, the imported agent's first turn shows it continues from the cache
(`cache_source`, `cached_tokens`, `prefilled_tokens`). Reports medians, the bundle's bytes
per token beside the cache file's, and throughput. Writes benchmarks/out/portable.json;
run_all.py renders it as BENCHMARKS.md section 11.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as c  # noqa: E402

NAME = "portable"
CHUNK = 4 * 1024 * 1024


def export_to(daemon: c.Daemon, name: str, path: Path) -> tuple[float, dict]:
    t0 = time.perf_counter()
    with daemon.client() as cl, open(path, "wb") as f:
        result = cl.export(name, f.write)
    return time.perf_counter() - t0, result


def import_from(daemon: c.Daemon, path: Path, name: str) -> tuple[float, dict]:
    def pieces():
        with open(path, "rb") as f:
            while data := f.read(CHUNK):
                yield data

    t0 = time.perf_counter()
    with daemon.client() as cl:
        result = cl.import_(pieces(), name=name)
    return time.perf_counter() - t0, result


def measure(model: Path, size: int, runs: int, root: Path) -> dict:
    name = f"a{size}"
    tok = c.Tok(model)
    built = c.build_agents(root / "a" / "data", model, [{"name": name, "system": c.system_prompt(tok, size)}])
    # The agent's stored cache, whatever its layout (blocks, tail and manifest): every file under caches/.
    cache_file_bytes = sum(f.stat().st_size for f in (root / "a" / "data" / "caches").rglob("*") if f.is_file())
    bundle = root / f"{name}.agent"
    exports, imports, results = [], [], []
    with c.Daemon(root / "a", model) as a, c.Daemon(root / "b", model) as b:
        for i in range(runs):
            t_export, exported = export_to(a, name, bundle)
            t_import, imported = import_from(b, bundle, f"{name}-{i}")
            exports.append(t_export)
            imports.append(t_import)
            results.append((exported, imported))
            c.log(f"{size}: export {t_export * 1000:.0f} ms, import {t_import * 1000:.0f} ms, "
                  f"{exported['bytes'] / 1e6:.1f} MB")
            if i < runs - 1:
                with b.client() as cl:
                    cl.delete(f"{name}-{i}")
        with b.client() as cl:
            first = c.timed_chat(cl, f"{name}-{runs - 1}", "Summarise that in one sentence.", max_tokens=8)
    exported, imported = results[-1]
    tokens = exported["cache_tokens"]
    hot = exports[1:] or exports
    return {
        "size": size,
        "tokens": tokens,
        "bundle_bytes": exported["bytes"],
        "bundle_bytes_per_token": exported["bytes"] / tokens,
        "cache_file_bytes": cache_file_bytes,
        "cache_file_bytes_per_token": cache_file_bytes / built["tokens"][name],
        "export_cold_s": exports[0],
        "export_hot_s": c.med(hot),
        "import_s": c.med(imports),
        "exports_s": exports,
        "imports_s": imports,
        "import_mb_per_s": exported["bytes"] / 1e6 / c.med(imports),
        "cache_imported": imported["cache_imported"],
        "first_turn": {k: first[k] for k in ("cache_source", "cached_tokens", "prefilled_tokens", "prompt_tokens",
                                             "restore_ms", "client_ttft_ms")},
        "build_s": built["build_s"],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="smoke run: small sizes, one run each")
    ap.add_argument("--model", help="an mlx-lm model folder [default: the default model]")
    ap.add_argument("--sizes", default="1024,8192", help="context sizes in tokens")
    ap.add_argument("--runs", type=int, default=3, help="export/import pairs per size")
    ap.add_argument("--out", type=Path, default=c.OUT_DIR / f"{NAME}.json")
    args = ap.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    if args.quick:
        sizes, args.runs = c.QUICK_SIZES, 1
    model = c.resolve_model(args.model)
    load_before = Path("/proc/loadavg").read_text().split()[:3] if Path("/proc/loadavg").exists() else None
    rows = []
    for size in sizes:
        root = c.short_tmp("bp-")
        try:
            rows.append(measure(model, size, args.runs, root))
        finally:
            c.rmtree(root)
    print(c.table([(r["size"], r["tokens"], c.fmt(r["bundle_bytes"] / 1e6), c.fmt(r["bundle_bytes_per_token"], 0),
                    c.fmt(r["export_cold_s"], 2), c.fmt(r["export_hot_s"], 2), c.fmt(r["import_s"], 2),
                    r["first_turn"]["cache_source"], r["first_turn"]["cached_tokens"]) for r in rows],
                  ("size", "tokens", "MB", "B/token", "export cold s", "export hot s", "import s", "then", "cached")))
    c.write_json(args.out, {"machine": c.machine_info(), "model": str(model), "runs": args.runs,
                            "loadavg_before": load_before,
                            "loadavg_after": Path("/proc/loadavg").read_text().split()[:3] if load_before else None,
                            "rows": rows})


if __name__ == "__main__":
    main()
