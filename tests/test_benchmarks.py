"""The benchmarks cannot rot: `run_all.py --quick` runs every issue-5 script end to end on a
tiny model (real daemon, real mlx_lm.server, plots and report) into a temp dir, and
`cpu_backend.py --quick` runs on the default model (both paths, its report section), and
`few_rows.py --quick` on a tiny model (products, forward passes, restart follow-up, section 8)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ["save_load", "ttft", "memory", "socket_overhead", "vs_mlx_server", "concurrency"]


def test_run_all_quick_on_a_tiny_model(tiny_llama_dir, home):
    out, plots, report = home / "out", home / "plots", home / "BENCHMARKS.md"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "run_all.py"), "--quick", "--model", str(tiny_llama_dir),
         "--out-dir", str(out), "--plots", str(plots), "--report", str(report)],
        capture_output=True, text=True, timeout=240, cwd=str(ROOT),
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for name in SCRIPTS:
        data = json.loads((out / f"{name}.json").read_text())
        assert data["machine"]["python"]
    ttft = json.loads((out / "ttft.json").read_text())
    assert all(s["resumed_runs"] == 1 and s["rebuilt_runs"] == 1 for s in ttft["sizes"])
    vs = json.loads((out / "vs_mlx_server.json").read_text())
    # mlx_lm.server's prompt cache served the follow-up: only the new turn was prefilled.
    assert vs["results"]["mlx_lm.server"]["same_process"][0]["cached_tokens"] > 0
    assert vs["results"]["mlx_lm.server"]["after_restart"][0]["cached_tokens"] == 0
    if importlib.util.find_spec("matplotlib"):  # the `bench` extra; plots are skipped without it
        assert {p.name for p in plots.glob("*.png")} >= {"ttft_vs_context.png", "save_load_vs_context.png"}
    text = report.read_text()
    for heading in ("## Machine", "## 1.", "## 2.", "## 3.", "## 4.", "## 5.", "## 7.", "Headline", "benchmarks/ttft.py",
                    "benchmarks/concurrency.py"):
        assert heading in text
    # Re-rendering from the JSON alone works and gives the same tables.
    again = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "run_all.py"), "--report-only", "--quick", "--out-dir", str(out),
         "--plots", str(plots), "--report", str(report)],
        capture_output=True, text=True, timeout=120, cwd=str(ROOT),
    )
    assert again.returncode == 0, again.stderr[-3000:]
    assert "## 5." in report.read_text()


@pytest.mark.model
def test_cpu_backend_quick_and_its_report_section(home):
    """benchmarks/cpu_backend.py end to end on the default model (512 tokens, no llama.cpp)."""
    out = home / "cpu_backend.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "cpu_backend.py"), "--quick", "--no-llama", "--runs", "1",
         "--out", str(out)],
        capture_output=True, text=True, timeout=900, cwd=str(ROOT),
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    d = json.loads(out.read_text())
    assert d["plain"]["kind"] == "plain" and "plan" not in d["plain"]
    assert d["fast"]["plan"]["device"] == "cpu" and d["fast"]["plan"]["compute_dtype"] == "float32"
    for kind in ("plain", "fast"):
        assert d[kind]["prefill_512_tok_s"] > 0 and d[kind]["decode_tok_s"] > 0
        assert len(d[kind]["greedy"]) == len(d[kind]["greedy_margins"]) == 3
    assert d["agreement"]["prompts"] == 3 and set(d["ratios"]) == {"prefill_512_tok_s", "decode_tok_s"}

    sys.path.insert(0, str(ROOT / "benchmarks"))
    import run_all

    section = "\n".join(run_all.cpu_backend_section(d))
    assert "## 6." in section and "agentd / plain" in section and "benchmarks/cpu_backend.py" in section


def test_few_rows_quick_and_its_report_section(tiny_llama_dir, home):
    """benchmarks/few_rows.py end to end: products through three BLAS entry points, forward
    passes alternating the forwarder's row limit and the attention in one process, a restart follow-up over the
    socket, and the section run_all renders from its JSON."""
    from agentd import blas

    if not (blas.find_openblas() and blas.build_gemv_forward()):
        pytest.skip("needs a system OpenBLAS and a C compiler")
    out = home / "few_rows.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "few_rows.py"), "--quick", "--model", str(tiny_llama_dir),
         "--out", str(out)],
        capture_output=True, text=True, timeout=300, cwd=str(ROOT),
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    d = json.loads(out.read_text())
    assert {"openblas", "agentd"} <= set(d["products"]["impls"])
    assert all(p["agentd"]["us"] > 0 for p in d["products"]["products"])
    modes = d["forward"]["modes"]
    assert set(modes) == {"agentd", "mlx_attention", "one_row_only"} and d["forward"]["max_rows"] >= 16
    assert all(t > 0 for mode in modes.values() for t in mode["ms"].values())
    r = d["restart"]
    assert [t["cache_source"] for t in r["follow_ups"]] == ["disk"]
    assert r["follow_up_cached"] > 0 and r["ratio"] > 0

    sys.path.insert(0, str(ROOT / "benchmarks"))
    import run_all

    section = "\n".join(run_all.few_rows_section(d))
    assert "## 8." in section and "benchmarks/few_rows.py" in section and "sooner" in section


def test_portable_quick_and_its_report_section(tiny_llama_dir, home):
    """benchmarks/portable.py end to end on a tiny model: two daemons, export, import, a turn."""
    out = home / "portable.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "portable.py"), "--quick", "--model", str(tiny_llama_dir),
         "--out", str(out)],
        capture_output=True, text=True, timeout=600, cwd=str(ROOT),
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    d = json.loads(out.read_text())
    for row in d["rows"]:
        assert row["cache_imported"] and row["first_turn"]["cache_source"] == "disk"
        assert row["first_turn"]["cached_tokens"] == row["tokens"] and row["bundle_bytes"] > 0

    sys.path.insert(0, str(ROOT / "benchmarks"))
    import run_all

    section = "\n".join(run_all.portable_section(d))
    assert section.startswith("## 11.") and "**Headline:**" in section and "benchmarks/portable.py" in section
