"""Why a rollout worker exited: its exit code says it, its launcher records it (``run/node<k>.json``,
``worker_exits``) and restarts the worker unless the run is over for it or its config cannot work
(:func:`restartable`). Kept apart from the worker so that the launcher reads these without importing
vLLM."""

from __future__ import annotations

import signal

FINISHED = 0  # the learner said the run is over (or the launcher's SIGTERM stopped it)
DROPPED = 75  # the controller gave up on it and told it so
ENGINE_DEAD = 76  # its vLLM engine died
REJOIN_FAILED = 77  # a restarted learner world asked it back and it could not come (engine state unknown)
CONFIG = 78  # its engine cannot serve what the config asks (its log says what): the run is stopped

_CAUSES = {
    FINISHED: "finished",
    DROPPED: "dropped by the controller",
    ENGINE_DEAD: "its vLLM engine died",
    REJOIN_FAILED: "could not rejoin a restarted learner",
    CONFIG: "its engine cannot serve the config",
}


def restartable(exitcode: int) -> bool:
    """Whether a worker that exited so is restarted: not when the run is over for it, nor when its
    config cannot work (it would fail the same way each time)."""
    return exitcode not in (FINISHED, CONFIG)


def cause(exitcode: int, killed_on_drop: bool = False) -> str:
    """A worker's exit in words; ``killed_on_drop``: its launcher killed it on the controller's (signed)
    drop notice, which is what a wedged worker that could not hear the controller exits of."""
    if killed_on_drop:
        return "killed: the controller dropped it"
    if exitcode in _CAUSES:
        return _CAUSES[exitcode]
    if exitcode < 0:
        try:
            return f"killed by {signal.Signals(-exitcode).name}"
        except ValueError:
            return f"killed by signal {-exitcode}"
    return f"crashed (exit code {exitcode})"
