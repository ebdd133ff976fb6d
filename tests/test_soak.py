"""A bounded soak: 32 concurrent clients of mixed requests against one real daemon on a
tiny model, their chats on several agents batched together by the scheduler. Only the errors concurrency makes legitimate, no deadlock, every chat reply
complete, memory back near its start afterwards."""

from __future__ import annotations

import os
import random
import signal
import statistics
import threading
import time
from collections import Counter, defaultdict

import psutil
import pytest

from agentctl.client import AgentdError, ClientError
from daemonproc import DaemonProc

CLIENTS = 32
SOAK_S = float(os.environ.get("AGENTD_SOAK_S", "45"))
NAMES = [f"s{i}" for i in range(10)]
SYSTEM = "You are a technical specialist. Explain root causes and the steps to fix them. "
# What concurrency makes legitimate: an agent deleted under us, evicting one that is
# generating, creating one that exists.
EXPECTED = {"NOT_FOUND", "BUSY", "ALREADY_EXISTS"}
MIX = {"chat": 30, "ping": 15, "status": 10, "save": 8, "evict": 10, "create": 9, "delete": 5, "list": 5,
       "history": 8}


class Soak:
    def __init__(self, d: DaemonProc, deadline: float):
        self.d, self.deadline = d, deadline
        self.latency: dict[str, list[float]] = defaultdict(list)
        self.expected: Counter = Counter()
        self.errors: list[str] = []
        self.chats_complete = 0
        self.lock = threading.Lock()

    def client(self, i: int) -> None:
        rng = random.Random(i)
        ops, weights = zip(*MIX.items())
        try:
            c = self.d.client(timeout=60)
            c.connect()
            while time.monotonic() < self.deadline:
                op = rng.choices(ops, weights)[0]
                name = rng.choice(NAMES)
                t = time.perf_counter()
                try:
                    self.run(c, op, name, rng, i)
                except AgentdError as e:
                    with self.lock:
                        if e.code in EXPECTED:
                            self.expected[f"{op}:{getattr(e.code, 'value', e.code)}"] += 1
                        else:
                            self.errors.append(f"{op} {name}: {e}")
                with self.lock:
                    self.latency[op].append(time.perf_counter() - t)
            c.close()
        except ClientError as e:  # a lost connection or a timeout: never expected
            with self.lock:
                self.errors.append(f"client {i}: {type(e).__name__}: {e}")

    def run(self, c, op: str, name: str, rng: random.Random, i: int) -> None:
        if op == "chat":
            stream = c.chat(name, f"client {i} says {rng.random():.6f}", max_tokens=rng.randint(1, 8))
            pieces = list(stream)
            result = stream.wait()  # the final result frame
            assert "".join(pieces) == result["text"] and result["finish_reason"] in ("stop", "length")
            with self.lock:
                self.chats_complete += 1
        elif op == "create":
            c.create(name, system=SYSTEM * rng.randint(1, 20))
        elif op in ("delete", "evict", "save", "history"):
            getattr(c, op)(name)
        else:
            getattr(c, op)()


def rss(d: DaemonProc) -> int:
    return psutil.Process(d.proc.pid).memory_info().rss


@pytest.mark.slow
def test_soak_32_clients_of_mixed_requests(home, tiny_llama_dir):
    d = DaemonProc(home, tiny_llama_dir, "--max-hot", "4", "--flush-interval", "0.5")
    with d:
        with d.client() as c:
            for n in NAMES:  # warm up: every code path once, then nothing hot
                c.create(n, system=SYSTEM * 10)
                list(c.chat(n, "warm up", max_tokens=8))
            for n in NAMES:
                c.evict(n)
        time.sleep(1.5)
        rss_before = rss(d)
        soak = Soak(d, time.monotonic() + SOAK_S)
        threads = [threading.Thread(target=soak.client, args=(i,), daemon=True) for i in range(CLIENTS)]
        t0 = time.monotonic()
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=SOAK_S + 90)
        elapsed = time.monotonic() - t0
        stuck = [t.name for t in threads if t.is_alive()]
        assert not stuck, f"deadlock: {len(stuck)} clients never finished"
        assert soak.errors == []
        with d.client() as c:
            status = c.status()
            assert not any(a.get("busy") for a in status["agents"])
            # The chats ran concurrently: decode passes carried several agents' turns at once.
            assert status["scheduler"]["max_batch"] >= 2 and status["scheduler"]["batched_steps"] > 0
            for a in status["agents"]:
                c.evict(a["name"])
        time.sleep(1.5)
        rss_after = rss(d)
        assert d.stop(signal.SIGTERM, timeout=60) == 0
    assert "Traceback" not in d.stderr()
    total = sum(map(len, soak.latency.values()))
    pings = sorted(soak.latency["ping"])
    p50, p99 = statistics.median(pings), pings[int(len(pings) * 0.99)]
    print(f"\nsoak: {CLIENTS} clients, {elapsed:.1f}s, {total} requests ({total / elapsed:.0f}/s), "
          f"{soak.chats_complete} complete chats, {status['scheduler']}; ping p50 {p50 * 1000:.1f} ms p99 {p99 * 1000:.1f} ms; "
          f"expected errors {dict(soak.expected)}; RSS {rss_before / 2**20:.0f} -> {rss_after / 2**20:.0f} MiB; "
          f"per op: { {op: len(v) for op, v in soak.latency.items()} }")
    assert soak.chats_complete > 100 and total > 1000
    assert rss_after <= rss_before * 1.25 + 64 * 2**20, (rss_before, rss_after)
