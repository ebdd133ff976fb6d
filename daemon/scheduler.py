"""The MLX thread: the one owner of the model and every cache, and the scheduler that
batches the turns of many agents.

Work arrives as two kinds of item, each answered through a concurrent Future:

* a **turn** (`submit_turn`): admitted as a sequence (store.begin_turn), then driven step
  by step with every other turn in flight -- each step is one decode forward pass for all
  decoding sequences plus a bounded prefill budget (stepper.py) -- and retired when done
  (store.end_turn writes the cache back and commits the turn before the Future resolves);
* a **job** (`submit`): anything else that touches MLX or the hot set (save, evict,
  delete, reset, flush, memory checks). Jobs run between steps, never inside a turn.

An idle scheduler that admits a turn while turns have lately run side by side, or while
more than one client is connected, waits a few ms for companions before its first step
(`ADMIT_WINDOW_S`), so turns sent at once start and batch together.

An item that names an agent (`agent=`) waits while that agent has a turn in flight, and
runs after it in arrival order: a second chat to a busy agent queues behind the first
(as before the scheduler), and so do its delete, reset, save and evict. Items for other
agents, and jobs naming none, do not wait.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol

log = logging.getLogger("agentd.scheduler")

# Turns sent "at once" by a program's threads reach the inbox up to several ms apart
# (measured: 0.1-6.6 ms for 3-4 client threads). The first, admitted alone, would prefill
# alone (a 40-token follow-up: ~0.3 s) while the others wait, then they prefill beside its
# decoding at the interleaved budget. So when an idle scheduler admits a turn while turns
# have lately run side by side, it waits this long for companions before the first step.
ADMIT_WINDOW_S = 0.010
# "Lately": a program that ran agents side by side this recently is likely to again. A
# program's first turns sent at once have no such past, but its clients are connected
# (one connection per agent thread, as in the demo) before they send: so the window also
# applies while more than one client is connected. A lone client's turns (no other
# connection, none in flight for this long) start at once, with no wait.
COMPANIONS_RECENT_S = 60.0


@dataclass
class _Job:
    fn: Callable[..., Any]
    args: tuple
    kwargs: dict
    agent: str | None
    future: Future = field(default_factory=Future)


class TurnPlan(Protocol):
    """What the scheduler needs of a turn op (turns.ChatPlan, turns.TurnOpPlan, ...)."""

    agent: str  # turns and jobs naming the same agent run one after another, in order

    def begin(self, store) -> Any: ...  # -> agents.Turn: admitted, its sequence prepared

    def end(self, store, turn) -> Any: ...  # the result, after the cache went back and the turn committed

    def abort(self, store, turn) -> None: ...  # a step failed: give up the turn, record nothing


@dataclass
class _TurnRequest:
    plan: TurnPlan
    future: Future = field(default_factory=Future)

    @property
    def agent(self) -> str:
        return self.plan.agent


class Scheduler:
    def __init__(self, name: str = "mlx"):
        self._inbox: queue.Queue = queue.Queue()
        self._waiting: dict[str, deque] = {}  # per agent: items behind its turn in flight
        self._active: list = []  # agents.Turn, admission order
        self._futures: dict[int, tuple] = {}  # id(turn) -> (its plan, its Future)
        self._busy: set[str] = set()
        self._side_by_side_at = float("-inf")  # monotonic time two turns were last in flight at once
        self.clients = 0  # greeted socket connections open; written by the server's thread only
        self.store = None  # the AgentStore, created on this thread by open_store()
        self.stepper = None
        self.after_turns: Callable[[], None] | None = None  # runs after retiring, between steps
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    # ---- any thread -----------------------------------------------------------------

    def open_store(self, make_store: Callable[[], Any]) -> Any:
        """Create the store on this thread (it touches MLX) and keep it; returns it or raises."""
        from .stepper import Stepper

        def attach():
            self.store = make_store()
            self.stepper = Stepper(self.store.engine)
            return self.store

        return self.submit(attach).result()

    def submit(self, fn: Callable[..., Any], *args: Any, agent: str | None = None, **kwargs: Any) -> Future:
        job = _Job(fn, args, kwargs, agent)
        self._inbox.put(job)
        return job.future

    def submit_turn(self, plan: TurnPlan) -> Future:
        """A turn: the Future resolves to `plan.end`'s result once the turn is committed."""
        req = _TurnRequest(plan)
        self._inbox.put(req)
        return req.future

    def status(self) -> dict:
        """Counters for `status` (plain ints, read without a lock: a glimpse, not a contract)."""
        stepper = self.stepper
        return {
            "turns_in_flight": len(self._active),
            "batched_steps": stepper.batched_steps if stepper else 0,
            "max_batch": stepper.max_batch if stepper else 0,
            "clients": self.clients,
        }

    def drain(self, timeout: float | None = None) -> bool:
        """Wait until every queued job has run. The thread itself is left alive on purpose:
        an MLX thread that exits while the interpreter shuts down can abort the process
        ("terminate called without an active exception"), so it dies with the process."""
        return self.submit(lambda: None).exception(timeout) is None

    # ---- the MLX thread -------------------------------------------------------------

    def _run(self) -> None:
        while True:
            try:
                self._take_inbox(block=not self._active)
                if self._active:
                    self._step()
            except BaseException:  # never let the owner of MLX die
                log.exception("scheduler loop failed")

    def _take_inbox(self, block: bool) -> None:
        try:
            item = self._inbox.get(block=block)
        except queue.Empty:
            return
        deadline = None
        while True:
            self._dispatch(item)
            if deadline is None and block and self._active and self._companions_likely():
                deadline = time.monotonic() + ADMIT_WINDOW_S
            try:
                if deadline is None:
                    item = self._inbox.get_nowait()
                else:
                    item = self._inbox.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                return

    def _companions_likely(self) -> bool:
        return self.clients > 1 or time.monotonic() - self._side_by_side_at < COMPANIONS_RECENT_S

    def _dispatch(self, item) -> None:
        name = item.agent
        if name is not None and (name in self._busy or self._waiting.get(name)):
            self._waiting.setdefault(name, deque()).append(item)
            return
        self._start(item)

    def _start(self, item) -> None:
        if not item.future.set_running_or_notify_cancel():
            return
        if isinstance(item, _Job):
            try:
                item.future.set_result(item.fn(*item.args, **item.kwargs))
            except BaseException as e:  # travels back to the requester, never kills the thread
                item.future.set_exception(e)
            return
        try:
            turn = item.plan.begin(self.store)
        except BaseException as e:
            item.future.set_exception(e)
            return
        self._active.append(turn)
        self._futures[id(turn)] = (item.plan, item.future)
        self._busy.add(item.agent)
        if len(self._active) > 1:
            self._side_by_side_at = time.monotonic()

    def _step(self) -> None:
        try:
            self.stepper.step([t.seq for t in self._active])
        except BaseException as e:
            log.exception("a step failed; ending the %d turn(s) in it", len(self._active))
            self.stepper.group = None
            self._settle([self._end(turn, error=e) for turn in list(self._active)])
            return
        finished = [t for t in self._active if t.seq.done]
        if not finished:
            return
        outcomes = [self._end(turn) for turn in finished]
        # Upkeep (memory limits) before the results go out, as when each chat was one job:
        # a client that reads status after its reply sees the evictions its turn caused.
        if self.after_turns is not None:
            try:
                self.after_turns()
            except Exception:
                log.exception("after-turn upkeep failed")
        self._settle(outcomes)

    def _end(self, turn, error: BaseException | None = None) -> tuple:
        """Retire a turn: its cache back to the agent, the turn committed (or aborted)."""
        self._active.remove(turn)
        plan, future = self._futures.pop(id(turn))
        try:
            if error is not None:
                plan.abort(self.store, turn)
                return future, None, error
            self.stepper.release(turn.seq)
            return future, plan.end(self.store, turn), None
        except BaseException as e:
            return future, None, e
        finally:
            self._busy.discard(plan.agent)

    def _settle(self, outcomes: list[tuple]) -> None:
        """Answer the retired turns, then start what waited for their agents."""
        for future, result, error in outcomes:
            if error is not None:
                future.set_exception(error)
            else:
                future.set_result(result)
        for name in [n for n in list(self._waiting) if n not in self._busy]:
            self._resume(name)

    def _resume(self, name: str) -> None:
        """Start what waited for this agent's turn, in order, until another turn holds it."""
        waiting = self._waiting.get(name)
        while waiting and name not in self._busy:
            self._start(waiting.popleft())
        if waiting is not None and not waiting:
            del self._waiting[name]
