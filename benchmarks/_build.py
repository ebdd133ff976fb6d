"""Build agents' contexts for a benchmark before its daemon starts: create each agent in the
daemon's home with `AgentStore`, prefill it with `AgentStore.warm` and save its cache, so
the daemon later restores it from disk exactly as it restores its own files.

    python benchmarks/_build.py HOME MODEL SPEC.json   (prints {name: tokens} as JSON)

SPEC is a list of {"name", "role", "system", "turns": [[user, assistant], ...]}. Nothing here is timed: it only saves the
benchmarks from prefilling every context once more through the daemon. If the engine left
the model quantized on MLX's CPU backend (whose quantized kernels are slow), the model is
first passed through `agentd.device.prepare_for_device` -- the daemon's CPU path, same
float32 compute dtype -- so building takes seconds instead of minutes.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from agentd import blas  # noqa: E402

blas.maybe_reexec_with_fast_blas()

import json  # noqa: E402


def speed_up(engine) -> str:
    """Prepare the engine's model for the CPU if the engine has not; returns what was done."""
    import mlx.nn as nn

    try:
        from agentd import device
    except ImportError:
        return "none (no agentd.device)"
    quantized = any(isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding)) for _, m in engine.model.named_modules())
    if not quantized or not device.on_cpu() or engine.dtype != device.CPU_COMPUTE_DTYPE:
        return "none"
    plan = device.prepare_for_device(engine.model)
    return f"prepare_for_device ({plan.dequantized} layers dequantized)"


def main() -> None:
    home, model, spec = Path(sys.argv[1]), Path(sys.argv[2]), json.loads(Path(sys.argv[3]).read_text())
    from agentd.agents import AgentStore
    from agentd.engine import Engine

    engine = Engine(model)
    how = speed_up(engine)
    store = AgentStore(home, engine)
    out = {}
    for a in spec:
        store.create(a["name"], a.get("role", ""), a["system"])
        for user, assistant in a.get("turns", []):
            store.records.append_turn(a["name"], user, assistant)
        store.warm(a["name"])
        out[a["name"]] = len(store._hot[a["name"]].tokens)
        store.evict(a["name"])  # saves: the file the daemon will find
        print(f"built {a['name']}: {out[a['name']]} tokens", file=sys.stderr, flush=True)
    store.close()
    print(json.dumps({"tokens": out, "speed_up": how, "blas": blas.mlx_blas()}))


if __name__ == "__main__":
    main()
