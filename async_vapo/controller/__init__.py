"""The controller: the learner side of the data road, a thread of learner rank 0.

service.py     the thread, its event loop and the main-thread API (Controller, Wiring)
registry.py    connected rollout workers and the questions asked about them
dispatch.py    who may sample now and how many prompts each gets (pure functions)
weights.py     new weights to the engines: snapshot and streamed publishes, acks, drops
evaluation.py  evaluation rounds (numbered; their groups never reach the training buffer)
metrics.py     the typed snapshot the trainer logs each step
"""

from async_vapo.controller.metrics import ControllerMetrics, SyncTotals
from async_vapo.controller.registry import RolloutTotals, WorkerState
from async_vapo.controller.service import Controller, Wiring
from async_vapo.controller.weights import GroupSettings, StreamTarget

__all__ = [
    "Controller",
    "ControllerMetrics",
    "GroupSettings",
    "RolloutTotals",
    "StreamTarget",
    "SyncTotals",
    "Wiring",
    "WorkerState",
]
