"""What the controller reports to the trainer each step: one typed snapshot, taken under its lock."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class SyncTotals:
    """Weight syncs acknowledged by engines since the start, with their send time and bytes."""

    count: int = 0
    seconds: float = 0.0
    nbytes: int = 0

    def add(self, seconds: float, nbytes: int) -> SyncTotals:
        return SyncTotals(self.count + 1, self.seconds + seconds, self.nbytes + nbytes)

    @property
    def seconds_per_mb(self) -> float:
        return self.seconds / max(1e-9, self.nbytes / 2**20)

    @property
    def mb_per_sync(self) -> float:
        """What one engine is sent per update: the model's bytes, or a LoRA adapter's
        (``model.lora_publish=adapter``)."""
        return self.nbytes / 2**20 / max(1, self.count)


@dataclass(frozen=True)
class ControllerMetrics:
    queue_depth: int  # groups admitted and waiting for the learner
    admitted: int
    rejected_stale: int
    filtered: int  # uniform-reward groups dropped by dynamic sampling
    duplicate: int
    staleness_hist: dict[str, int]  # trained groups by staleness (learner version - oldest token's)
    capacity: int  # prompts the staleness bound allows to start now
    running: int  # prompts out at workers
    ledger: dict[str, int]
    rejected_frames: dict[str, int]  # by reason, data socket and control socket (``control_`` prefix)
    worker_versions: dict[str, int]
    worker_owners: dict[str, int]  # the learner rank feeding each engine (streamed publish)
    counters: dict[str, int]  # group verdicts, verifier outcomes, drops, failed syncs
    groups_by_worker: dict[str, int]  # valid groups each live worker delivered (admitted, filtered or stale)
    syncs: SyncTotals
