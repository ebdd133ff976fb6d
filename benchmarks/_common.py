"""What the issue-5 benchmark scripts share: the model, prompts of a given length, a real
daemon as a subprocess, the machine's description, tables and JSON output.

Each script imports this beside itself (`benchmarks/` is not a package).
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT_DIR = ROOT / "benchmarks" / "out"
SIZES = [256, 512, 1024, 2048, 4096, 8192]
QUICK_SIZES = [64, 128]

# Prose with numbers so the tokenizer sees ordinary text, not one repeated token. Tiny test
# models know only ASCII letters, digits and punctuation, which is all this uses.
_SENTENCES = [
    "The payment API returns a 500 error when the card token expires during checkout.",
    "Support saw {n} tickets about it before the on-call engineer rolled back release {m}.",
    "Business impact: revenue, customers, support tickets, and the service level agreement.",
    "Step {n}: check the gateway logs, compare the token age with the session age, and note it.",
    "The database replica in zone {m} lagged by {n} seconds while the batch job ran.",
    "You are a technical specialist. Explain root causes and the steps to fix them.",
]


def filler(n_sentences: int) -> str:
    out = []
    for i in range(n_sentences):
        s = _SENTENCES[i % len(_SENTENCES)]
        out.append(s.format(n=(i * 37) % 1000, m=(i * 11) % 97))
    return " ".join(out)


class Tok:
    """The model folder's tokenizer, without loading the model (clients need only this)."""

    def __init__(self, model_dir: Path):
        from tokenizers import Tokenizer

        self.tk = Tokenizer.from_file(str(Path(model_dir) / "tokenizer.json"))

    def count(self, text: str) -> int:
        return len(self.tk.encode(text, add_special_tokens=False).ids)

    def text_of_length(self, n: int, seed_sentences: int = 0) -> str:
        """Text of about `n` tokens (exact for most tokenizers after one re-encode)."""
        text = filler(max(8, n // 8) + seed_sentences)
        while self.count(text) < n:
            text += " " + text
        ids = self.tk.encode(text, add_special_tokens=False).ids[:n]
        return self.tk.decode(ids)


# Tokens the chat template adds around a system prompt and one short user message (SmolLM2's
# template adds ~15); prompts are sized so the whole conversation is about the target.
TEMPLATE_SLACK = 24


def system_prompt(tok: Tok, total: int) -> str:
    return tok.text_of_length(max(8, total - TEMPLATE_SLACK))


def default_model() -> Path:
    """The default model folder (SmolLM2-135M-Instruct), converted from its GGUF if needed."""
    sys.path.insert(0, str(ROOT))
    from agentd import paths
    from agentd.convert import ensure_default_model

    return ensure_default_model(paths.default_model_dir())


def resolve_model(arg: str | None) -> Path:
    return Path(arg).expanduser().resolve() if arg else default_model()


# ---- statistics and output ---------------------------------------------------------------


def med(xs: list[float]) -> float | None:
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def fmt(x, digits: int = 1) -> str:
    if x is None:
        return "-"
    if isinstance(x, str):
        return x
    return f"{x:,.{digits}f}"


def table(rows: list[tuple], header: tuple) -> str:
    rows = [tuple(str(c) for c in r) for r in [header, *rows]]
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    lines = ["  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def write_json(path: Path, data: dict) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = {"when": time.strftime("%Y-%m-%dT%H:%M:%S"), "argv": [Path(sys.argv[0]).name, *sys.argv[1:]], **data}
    path.write_text(json.dumps(data, indent=1))
    try:
        shown = path.relative_to(ROOT)
    except ValueError:
        shown = path
    print(f"wrote {shown}")
    return path


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def short_tmp(prefix: str) -> Path:
    """A short temp dir: Unix socket paths inside it stay under macOS's 103 bytes."""
    return Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---- the real daemon -------------------------------------------------------------------


class Daemon:
    """`python -m agentd` on a private home and socket, as a user (or launchd) starts it."""

    def __init__(self, home: Path, model: Path, *args: str):
        self.home = Path(home)
        self.socket = self.home / "run" / "agentd.sock"
        self.model = Path(model)
        self.args = list(args)
        self.proc: subprocess.Popen | None = None
        self.log = self.home / "daemon-stderr.log"
        self.start_s: float | None = None

    def start(self, timeout: float = 180.0) -> "Daemon":
        sys.path.insert(0, str(ROOT))
        from agentctl.client import Client, ClientError

        self.home.mkdir(parents=True, exist_ok=True)
        err = open(self.log, "ab")
        argv = [sys.executable, "-m", "agentd", "--home", str(self.home / "data"), "--socket", str(self.socket),
                "--model", str(self.model), "--log-level", "warning", *self.args]
        env = {**daemon_env(), "PYTHONUNBUFFERED": "1"}
        t0 = time.perf_counter()
        self.proc = subprocess.Popen(argv, stdout=err, stderr=err, env=env, cwd=str(ROOT))
        err.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"agentd exited with {self.proc.returncode}:\n{self.stderr()[-3000:]}")
            try:
                with Client(self.socket, timeout=5) as c:
                    c.ping()
                self.start_s = time.perf_counter() - t0
                return self
            except ClientError:
                time.sleep(0.05)
        self.kill()
        raise TimeoutError(f"agentd did not answer within {timeout}s:\n{self.stderr()[-3000:]}")

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def client(self, timeout: float = 900.0):
        from agentctl.client import Client

        return Client(self.socket, timeout=timeout)

    def stderr(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def stop(self, timeout: float = 120.0) -> int:
        """SIGTERM: the daemon flushes every dirty agent, then exits."""
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise

    def restart(self) -> "Daemon":
        self.stop()
        return self.start()

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def __enter__(self) -> "Daemon":
        return self.start()

    def __exit__(self, *exc) -> None:
        try:
            self.stop()
        finally:
            self.kill()


def daemon_env() -> dict[str, str]:
    """This environment without the BLAS preload a benchmark's own re-exec added: the daemon
    chooses its BLAS itself, as it does when a user starts it."""
    env = dict(os.environ)
    if env.pop("AGENTD_BLAS_REEXEC", None):
        kept = [p for p in env.get("LD_PRELOAD", "").split(":") if p and "openblas" not in p]
        if kept:
            env["LD_PRELOAD"] = ":".join(kept)
        else:
            env.pop("LD_PRELOAD", None)
    return env


def timed_chat(client, name: str, message: str, max_tokens: int = 8, rebuild: bool = False) -> dict:
    """One chat turn; adds the client-side time to the first token frame and to the end.
    `rebuild` asks the daemon to prefill the whole transcript (no cache from memory or disk)."""
    t0 = time.perf_counter()
    stream = client.chat(name, message, max_tokens=max_tokens, temperature=0.0, rebuild=rebuild)
    first = None
    for _piece in stream:
        if first is None:
            first = time.perf_counter() - t0
    result = stream.wait()
    total = time.perf_counter() - t0
    return {**result, "client_ttft_ms": round((first if first is not None else total) * 1000, 3),
            "client_total_ms": round(total * 1000, 3)}


# ---- the machine -----------------------------------------------------------------------


def machine_info() -> dict:
    import importlib.metadata as md

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    if sys.platform == "darwin":
        try:
            cpu = subprocess.run(["sysctl", "-n", "machdep.cpu.brand_string"], capture_output=True,
                                 text=True).stdout.strip() or cpu
        except OSError:
            pass
    try:
        import psutil

        ram = psutil.virtual_memory().total
    except ImportError:
        ram = None
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count()

    def version(dist: str) -> str | None:
        try:
            return md.version(dist)
        except md.PackageNotFoundError:
            return None

    return {
        "cpu": cpu,
        "cpus": os.cpu_count(),
        "cpus_usable": usable,
        "ram_bytes": ram,
        "os": platform.platform(),
        "python": platform.python_version(),
        "mlx": version("mlx"),
        "mlx_lm": version("mlx-lm") or version("mlx_lm"),
        "load_avg": os.getloadavg() if hasattr(os, "getloadavg") else None,
    }


def rmtree(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


def process_blas(pid: int) -> str:
    """The BLAS a running process has mapped for MLX, as `agentd.blas.mlx_blas` names it."""
    from agentd.blas import mlx_blas

    found = mlx_blas(pid)
    return "accelerate" if found == "unknown" and sys.platform == "darwin" else found


def build_agents(data_home: Path, model: Path, spec: list[dict]) -> dict:
    """Create and prefill agents in a daemon's home (`--home` DIR) before it starts; see _build.py."""
    data_home.mkdir(parents=True, exist_ok=True)
    spec_path = data_home.parent / "build-spec.json"
    spec_path.write_text(json.dumps(spec))
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, str(Path(__file__).with_name("_build.py")), str(data_home), str(model),
                           str(spec_path)], stdout=subprocess.PIPE, env=daemon_env(), text=True, cwd=str(ROOT))
    if proc.returncode != 0:
        raise SystemExit(f"building the agents failed ({proc.returncode})")
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    out["build_s"] = time.perf_counter() - t0
    log(f"built {len(spec)} agent(s) in {out['build_s']:.0f} s (speed-up: {out['speed_up']})")
    return out
