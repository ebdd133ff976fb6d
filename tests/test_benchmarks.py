"""The issue-5 benchmarks cannot rot: `run_all.py --quick` runs every script end to end on a
tiny model (real daemon, real mlx_lm.server, plots and report) into a temp dir."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ["save_load", "ttft", "memory", "socket_overhead", "vs_mlx_server"]


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
    for heading in ("## Machine", "## 1.", "## 2.", "## 3.", "## 4.", "## 5.", "Headline", "benchmarks/ttft.py"):
        assert heading in text
    # Re-rendering from the JSON alone works and gives the same tables.
    again = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "run_all.py"), "--report-only", "--quick", "--out-dir", str(out),
         "--plots", str(plots), "--report", str(report)],
        capture_output=True, text=True, timeout=120, cwd=str(ROOT),
    )
    assert again.returncode == 0, again.stderr[-3000:]
    assert "## 5." in report.read_text()
