"""A pool of verifier worker processes with a hard per-sample timeout.

Each worker is a spawned process serving one request at a time over a pipe. A sample whose verifiers
hang past ``timeout_s`` gets ``Verdict(False, "timeout")``; its worker is killed and replaced. The
clock starts once the verifiers are loaded: a replacement worker's start-up and imports are not charged to
the next sample (else one hang would cascade into timeouts on a slow machine). A verifier
that raises gives ``"error"``; one that returns something outside the interface (``rewards.base``) gives
``"bad_output"``; a worker that dies gives ``"error"`` and is replaced. The caller never sees an exception
for a sample and the pool never waits longer than ``timeout_s`` per sample. ``counts`` tallies every
outcome.

Verifiers are registry names or "module:attr" names (the attribute is a zero-argument factory); a task
of several (``Scoring.spec``) is scored by each, and their rewards are summed with their weights.
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import multiprocessing as mp
import os
import threading
import time
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any

from async_vapo.protocol.messages import verdict_kind
from async_vapo.rewards.base import DEFAULT_RANGE, Scoring, Verdict, declared_range, normalise


class _Loaded:
    """A verifier loaded in a pool process: the object, its declared reward range and the context
    keywords its signature takes (None: all of them, it takes ``**kwargs``)."""

    def __init__(self, name: str) -> None:
        from async_vapo.rewards.verifiers import REGISTRY

        self.fn: Any
        if name in REGISTRY:
            self.fn = REGISTRY[name]()
        else:
            mod, _, attr = name.partition(":")
            self.fn = getattr(importlib.import_module(mod), attr)()
        self.reward_range = declared_range(self.fn)
        self.accepts = _context_keywords(self.fn)

    def __call__(self, response: str, answer: str, context: dict[str, Any]) -> Verdict:
        kwargs = context if self.accepts is None else {k: v for k, v in context.items() if k in self.accepts}
        try:
            return normalise(self.fn(response, answer, **kwargs), self.reward_range)
        except Exception as exc:
            return Verdict(False, f"error: {type(exc).__name__}"[:60])


def _context_keywords(fn: Any) -> frozenset[str] | None:
    """The keyword arguments ``fn(response, answer, ...)`` takes beyond the first two (None: any)."""
    try:
        params = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):
        return frozenset()
    if any(p.kind is p.VAR_KEYWORD for p in params):
        return None
    named = [p for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    return frozenset(p.name for p in named[2:])


def _serve(conn: Connection, threads: int) -> None:
    """Child loop. Per request (task spec, response, answer, context): ("start",) once its verifiers are
    loaded (imports and start-up are not charged to the sample's timeout), then ("done", [(correct,
    detail, reward), ...]) with one verdict per verifier of the spec. A request ("load", name) answers
    ("loaded", reward_range) or ("done", [error]) (the launcher's check)."""
    os.environ["OMP_NUM_THREADS"] = str(threads)
    cache: dict[str, _Loaded] = {}
    while True:
        try:
            req = conn.recv()
        except EOFError:
            return
        if req is None:
            return
        task, response, answer, context = req
        names = [response] if task == "load" else list(Scoring.parse(task).names)
        try:
            verifiers = [cache[n] if n in cache else cache.setdefault(n, _Loaded(n)) for n in names]
        except Exception as exc:
            conn.send(
                ("done", [(False, f"error: cannot load verifier ({type(exc).__name__}: {exc})"[:200], None)])
            )
            continue
        if task == "load":
            conn.send(("loaded", verifiers[0].reward_range))
            continue
        conn.send(("start",))
        out = [v(response, answer, context) for v in verifiers]
        conn.send(("done", [(o.correct, o.detail, o.reward) for o in out]))


@dataclass(frozen=True)
class VerifierCheck:
    """A launch-time check of one verifier: why it cannot be used (None: it loads) and its declared
    reward range (for graded rewards)."""

    error: str | None
    reward_range: tuple[float, float] = DEFAULT_RANGE


def check_verifier(name: str, timeout_s: float = 60.0) -> VerifierCheck:
    """Load verifier ``name`` in a child process exactly as the pool's workers do (a launch-time check):
    its declared reward range once it is loaded, or why it cannot be used (an import error, a misspelled
    factory, a bad ``reward_range``, a load that takes longer than ``timeout_s``)."""
    w = _Worker(mp.get_context("spawn"))
    try:
        w.conn.send(("load", name, "", {}))
        if not w.conn.poll(timeout_s):
            return VerifierCheck(f"it did not load within {timeout_s:.0f} s")
        msg = w.conn.recv()
        return VerifierCheck(None, tuple(msg[1])) if msg[0] == "loaded" else VerifierCheck(str(msg[1][0][1]))
    except (EOFError, OSError) as exc:
        return VerifierCheck(f"its process died while loading it ({type(exc).__name__})")
    finally:
        w.kill()


class _Worker:
    def __init__(self, ctx) -> None:
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_serve, args=(child, 1), daemon=True)
        self.proc.start()
        child.close()

    def kill(self) -> None:
        self.proc.kill()
        self.proc.join(5)
        self.conn.close()


class VerifierPool:
    def __init__(
        self,
        processes: int = 1,
        timeout_s: float = 5.0,
        load_timeout_s: float = 120.0,
        correct_reward: float = 1.0,
        wrong_reward: float = 0.0,
    ) -> None:
        self.timeout_s = timeout_s
        self.rewards = correct_reward, wrong_reward  # of binary verdicts, when several verifiers are summed
        self.load_timeout_s = load_timeout_s  # worker start-up + loading a verifier (not per sample)
        self._ctx = mp.get_context("spawn")
        self._idle: list[_Worker] = [_Worker(self._ctx) for _ in range(max(1, processes))]
        self._lock = threading.Condition()
        self.counts: Counter[str] = Counter()
        self.seconds = 0.0
        n = len(self._idle)
        self._threads = ThreadPoolExecutor(n, thread_name_prefix="verify") if n > 1 else None

    def _acquire(self) -> _Worker:
        with self._lock:
            while not self._idle:
                self._lock.wait()
            return self._idle.pop()

    def _release(self, w: _Worker) -> None:
        with self._lock:
            self._idle.append(w)
            self._lock.notify()

    def score_one(
        self, task: str, response: str, answer: str, context: dict[str, Any] | None = None
    ) -> Verdict:
        """The verdict of ``task``'s verifiers (one name, or ``Scoring.spec``'s weighted list) on one
        response; ``context``: the keyword arguments a verifier may take (``prompt``, the row's extras)."""
        w = self._acquire()
        t0 = time.perf_counter()
        verdict: Verdict
        try:
            w.conn.send((task, response, answer, context or {}))
            # the sample's clock starts when the verifier is loaded (a fresh worker first starts up)
            deadline = time.monotonic() + max(self.timeout_s, self.load_timeout_s)
            verdict = Verdict(False, "timeout")
            while w.conn.poll(max(0.0, deadline - time.monotonic())):
                msg = w.conn.recv()
                if msg[0] == "start":
                    deadline = time.monotonic() + self.timeout_s
                    continue
                verdicts = [Verdict(bool(c), str(d), None if r is None else float(r)) for c, d, r in msg[1]]
                verdict = (
                    Scoring.parse(task).combine(verdicts, *self.rewards) if len(verdicts) > 1 else verdicts[0]
                )
                break
            else:
                w.kill()
                w = _Worker(self._ctx)
        except (EOFError, OSError, BrokenPipeError):
            verdict = Verdict(False, "error: worker died")
            w.kill()
            w = _Worker(self._ctx)
        finally:
            self._release(w)
        self.seconds += time.perf_counter() - t0
        self.counts[verdict_kind(verdict.detail)] += 1
        return verdict

    def score(self, items: Sequence[tuple[Any, ...]]) -> list[Verdict]:
        """Score (task, response, answer[, context]) items, in parallel over the pool's workers."""
        if len(items) <= 1 or self._threads is None:
            return [self.score_one(*it) for it in items]
        return list(self._threads.map(lambda it: self.score_one(*it), items))

    def close(self) -> None:
        if self._threads is not None:
            self._threads.shutdown()
        with self._lock:
            workers, self._idle = self._idle, []
        for w in workers:  # all told first: they exit (and tear down sympy & co.) side by side
            with contextlib.suppress(OSError):
                w.conn.send(None)
        deadline = time.monotonic() + 2.0
        for w in workers:
            w.proc.join(max(0.0, deadline - time.monotonic()))
            if w.proc.is_alive():
                w.kill()
