"""A pool of verifier worker processes with a hard per-sample timeout.

Each worker is a spawned process serving one request at a time over a pipe. A sample whose verifier
hangs past ``timeout_s`` gets ``Verdict(False, "timeout")``; its worker is killed and replaced. The
clock starts once the verifier is loaded: a replacement worker's start-up and imports are not charged to
the next sample (else one hang would cascade into timeouts on a slow machine). A verifier
that raises gives ``"error"``; one that returns something other than a ``Verdict`` gives ``"bad_output"``;
a worker that dies gives ``"error"`` and is replaced. The caller never sees an exception for a sample and
the pool never waits longer than ``timeout_s`` per sample. ``counts`` tallies every outcome.

Extra verifiers can be registered as "module:attr" names (the attribute is a zero-argument factory).
"""

from __future__ import annotations

import contextlib
import importlib
import multiprocessing as mp
import os
import threading
import time
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from multiprocessing.connection import Connection

from async_vapo.protocol.messages import verdict_kind
from async_vapo.rewards.base import Verdict


def _load(name: str):
    from async_vapo.rewards.verifiers import REGISTRY

    if name in REGISTRY:
        return REGISTRY[name]()
    mod, _, attr = name.partition(":")
    return getattr(importlib.import_module(mod), attr)()


def _serve(conn: Connection, threads: int) -> None:
    """Child loop. Per request: ("start",) once the verifier is loaded (imports and start-up are not
    charged to the sample's timeout), then ("done", correct, detail)."""
    os.environ["OMP_NUM_THREADS"] = str(threads)
    cache: dict[str, object] = {}
    while True:
        try:
            req = conn.recv()
        except EOFError:
            return
        if req is None:
            return
        task, response, answer = req
        try:
            fn = cache.get(task)
            if fn is None:
                fn = cache[task] = _load(task)
        except Exception as exc:
            conn.send(("done", False, f"error: cannot load verifier ({type(exc).__name__})"[:60]))
            continue
        conn.send(("start",))
        try:
            out = fn(response, answer)  # type: ignore[operator]
            if not isinstance(out, Verdict):
                out = Verdict(False, "bad_output")
        except Exception as exc:
            out = Verdict(False, f"error: {type(exc).__name__}"[:60])
        conn.send(("done", out.correct, out.detail))


def check_verifier(name: str, timeout_s: float = 60.0) -> str | None:
    """Load verifier ``name`` in a child process exactly as the pool's workers do (a launch-time check):
    None once it is loaded, or why it cannot be used (an import error, a misspelled factory, a load that
    takes longer than ``timeout_s``). Scoring is not tried: a verifier's answers are its own business."""
    w = _Worker(mp.get_context("spawn"))
    try:
        w.conn.send((name, "", ""))
        if not w.conn.poll(timeout_s):
            return f"it did not load within {timeout_s:.0f} s"
        msg = w.conn.recv()
        return None if msg[0] == "start" else str(msg[2])
    except (EOFError, OSError) as exc:
        return f"its process died while loading it ({type(exc).__name__})"
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
    def __init__(self, processes: int = 1, timeout_s: float = 5.0, load_timeout_s: float = 120.0) -> None:
        self.timeout_s = timeout_s
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

    def score_one(self, task: str, response: str, answer: str) -> Verdict:
        w = self._acquire()
        t0 = time.perf_counter()
        verdict: Verdict
        try:
            w.conn.send((task, response, answer))
            # the sample's clock starts when the verifier is loaded (a fresh worker first starts up)
            deadline = time.monotonic() + max(self.timeout_s, self.load_timeout_s)
            verdict = Verdict(False, "timeout")
            while w.conn.poll(max(0.0, deadline - time.monotonic())):
                msg = w.conn.recv()
                if msg[0] == "start":
                    deadline = time.monotonic() + self.timeout_s
                    continue
                verdict = Verdict(bool(msg[1]), str(msg[2]))
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

    def score(self, items: Sequence[tuple[str, str, str]]) -> list[Verdict]:
        """Score (task, response, answer) items, in parallel over the pool's workers."""
        if len(items) <= 1 or self._threads is None:
            return [self.score_one(*it) for it in items]
        return list(self._threads.map(lambda it: self.score_one(*it), items))

    def close(self) -> None:
        if self._threads is not None:
            self._threads.shutdown()
        with self._lock:
            workers, self._idle = self._idle, []
        for w in workers:
            with contextlib.suppress(OSError):
                w.conn.send(None)
            w.proc.join(2)
            if w.proc.is_alive():
                w.kill()
