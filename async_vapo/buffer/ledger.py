"""Where every prompt is: the data cursor, prompts handed out, requeued, trained on, filtered.

Prompts come from a dataset in a seeded, per-epoch shuffled order (``cursor`` = rows consumed so far).
Requeued prompts (a stale group, a lost worker, a checkpoint resume) are handed out before new rows, so
none is lost. ``state_dict`` / ``load_state_dict`` save the cursor and the requeue list with the
outstanding prompts folded in: after a resume they are sampled again, none skipped, none trained twice.
"""

from __future__ import annotations

import random
import secrets
from collections import Counter, deque
from collections.abc import Callable, Sequence
from enum import Enum
from typing import Any, NamedTuple

from async_vapo.protocol.messages import Prompt


class Requeue(str, Enum):
    """Why a prompt goes back to the line: counted as ``requeued_<value>`` in ``counts`` (and, when it was
    the prompt's last attempt, as ``failed_<value>``), so every name the ledger counts is listed here."""

    def __str__(self) -> str:
        return self.value

    STALE = "stale"  # its group was older than train.max_staleness allows
    WORKER_LOST = "worker_lost"  # its worker is gone (requeue_worker's default)
    WORKER_RESTARTED = "worker_restarted"  # its worker said Hello again
    # its worker was dropped by the controller (controller.counters.worker_dropped's reasons)
    HEARTBEAT = "heartbeat"
    UNREACHABLE = "unreachable"
    STALLED = "stalled"
    WEIGHT_SYNC_FAILED = "weight_sync_failed"
    # a failed attempt (PromptLedger.retry): its worker reported a failure, its deadline passed, or the
    # group its worker sent was refused (controller.admission.GroupRejection's own-output reasons)
    ROLLOUT_FAILED = "rollout_failed"
    DEADLINE = "deadline"
    BAD_GROUP_SAMPLE_COUNT = "bad_group_sample_count"
    BAD_GROUP_LENGTH = "bad_group_length"
    BAD_GROUP_MODEL_LEN = "bad_group_model_len"
    BAD_GROUP_TOKEN_RANGE = "bad_group_token_range"
    BAD_GROUP_VERSIONS = "bad_group_versions"
    BAD_GROUP_REWARD = "bad_group_reward"


class Issued(NamedTuple):
    """An outstanding prompt: who has it, the exact prompt sent (with its ticket) and the worker's
    policy version when it was sent (no token of its group can be older)."""

    worker_id: str
    prompt: Prompt
    version: int = 0
    at: float = 0.0  # when it was sent (the caller's monotonic clock; 0 = never expires)


class PromptLedger:
    def __init__(
        self,
        rows: Sequence[Prompt] | Callable[[int], Prompt],
        n_rows: int | None = None,
        seed: int = 0,
        shuffle: bool = True,
    ) -> None:
        if callable(rows):
            if n_rows is None:
                raise ValueError("n_rows is required with a row factory")
            self._row = rows
            self.n_rows = n_rows
        else:
            seq = rows
            self._row = lambda i: seq[i]
            self.n_rows = len(seq)
        if self.n_rows == 0:
            raise ValueError("the prompt dataset is empty")
        self.seed = seed
        self.shuffle = shuffle
        self.cursor = 0
        self.requeued: deque[Prompt] = deque()
        self.outstanding: dict[str, Issued] = {}  # uid -> who has it, not back yet
        self.in_buffer: dict[str, Prompt] = {}  # came back, waiting to be trained on
        self.counts: Counter[str] = Counter()
        self.trained_uids: list[str] = []
        self.filtered_uids: list[str] = []  # dropped by dynamic sampling (spent, like trained ones)
        self.failed_uids: list[str] = []  # out of attempts (``retry``): spent, never trained
        self.failures: Counter[str] = Counter()  # uid -> failed attempts so far
        self._order_epoch = -1
        self._order: list[int] = []

    def _row_at(self, position: int) -> Prompt:
        epoch, i = divmod(position, self.n_rows)
        if epoch != self._order_epoch:
            self._order = list(range(self.n_rows))
            if self.shuffle:
                random.Random(self.seed * 1_000_003 + epoch).shuffle(self._order)
            self._order_epoch = epoch
        row = self._row(self._order[i])
        return Prompt(uid=f"{row.uid}@{epoch}", token_ids=row.token_ids, answer=row.answer, task=row.task)

    def take(self, n: int, worker_id: str, version: int = 0, at: float = 0.0) -> list[Prompt]:
        """``n`` prompts for ``worker_id`` (whose engine holds policy ``version``), requeued ones first.

        Each carries a fresh random ``ticket``: a group is only accepted with the ticket of the prompt
        it answers, so no peer that did not receive the prompt can answer it (``controller.admission``)."""
        out: list[Prompt] = []
        while len(out) < n:
            if self.requeued:
                p = self.requeued.popleft()
            else:
                if self.cursor % self.n_rows == 0 and self.cursor:
                    self._forget_old_epochs(self.cursor // self.n_rows)
                p = self._row_at(self.cursor)
                self.cursor += 1
            p = Prompt(p.uid, p.token_ids, p.answer, p.task, p.attempt, secrets.token_hex(8))
            self.outstanding[p.uid] = Issued(worker_id, p, version, at)
            out.append(p)
        self.counts["issued"] += len(out)
        return out

    def requeue(self, uid: str, reason: Requeue) -> None:
        """Put an outstanding or returned prompt back at the head of the line (attempt + 1)."""
        key = f"requeued_{Requeue(reason).value}"  # an unknown reason raises before anything moves
        entry = self.outstanding.pop(uid, None)
        p = entry.prompt if entry is not None else self.in_buffer.pop(uid, None)
        if p is None:
            return
        self.requeued.append(Prompt(p.uid, p.token_ids, p.answer, p.task, p.attempt + 1))
        self.counts[key] += 1

    def retry(self, uid: str, reason: Requeue, max_attempts: int) -> bool:
        """A failed attempt at outstanding prompt ``uid`` (its rollout failed, or its group was malformed):
        requeued while it has failed fewer than ``max_attempts`` times, else spent and counted ``failed``.
        False when ``uid`` was not outstanding (nothing changed)."""
        failed = f"failed_{Requeue(reason).value}"
        if uid not in self.outstanding:
            return False
        self.failures[uid] += 1
        if self.failures[uid] < max_attempts:
            self.requeue(uid, reason)
            return True
        del self.outstanding[uid], self.failures[uid]
        self.counts["failed"] += 1
        self.counts[failed] += 1
        self.failed_uids.append(uid)
        return True

    def requeue_worker(self, worker_id: str, reason: Requeue = Requeue.WORKER_LOST) -> int:
        uids = [u for u, issued in self.outstanding.items() if issued.worker_id == worker_id]
        for u in uids:
            self.requeue(u, reason)
        return len(uids)

    def returned(self, uid: str) -> bool:
        """A group for ``uid`` came back. False for a duplicate or an unknown prompt (then drop it)."""
        entry = self.outstanding.pop(uid, None)
        if entry is None:
            return False
        self.in_buffer[uid] = entry.prompt
        return True

    def overdue(self, sent_before: float) -> list[Issued]:
        """Outstanding prompts sent before ``sent_before`` (and with a send time at all)."""
        return [i for i in self.outstanding.values() if 0 < i.at < sent_before]

    def issued(self, uid: str) -> Issued | None:
        """The outstanding prompt ``uid`` as it was sent, or None (never issued, or already back)."""
        return self.outstanding.get(uid)

    def finish(self, uid: str, outcome: str) -> None:
        """``outcome``: "trained" or "filtered"."""
        if self.in_buffer.pop(uid, None) is not None:
            self.failures.pop(uid, None)
            self.counts[outcome] += 1
            (self.trained_uids if outcome == "trained" else self.filtered_uids).append(uid)

    def _forget_old_epochs(self, epoch: int) -> None:
        """Keep the trained/filtered-uid audit of the last two epochs only (older prompts can no longer be
        in flight), so that the ledger and its checkpoints stay bounded over a long run."""
        self.trained_uids = self._recent(self.trained_uids, epoch, "trained_uids_forgotten")
        self.filtered_uids = self._recent(self.filtered_uids, epoch, "filtered_uids_forgotten")
        self.failed_uids = self._recent(self.failed_uids, epoch, "failed_uids_forgotten")

    def _recent(self, uids: list[str], epoch: int, forgotten: str) -> list[str]:
        """The uids of epochs ``epoch - 1`` and later; the others are counted under ``forgotten``."""
        keep = [u for u in uids if int(u.rsplit("@", 1)[1]) >= epoch - 1]
        self.counts[forgotten] += len(uids) - len(keep)
        return keep

    def state_dict(self) -> dict[str, Any]:
        pending = (
            list(self.requeued)
            + list(self.in_buffer.values())
            + [i.prompt for i in self.outstanding.values()]
        )
        return {
            "cursor": self.cursor,
            "seed": self.seed,
            "pending": [[p.uid, p.token_ids, p.answer, p.task, p.attempt] for p in pending],
            "counts": dict(self.counts),
            "trained_uids": list(self.trained_uids),
            "filtered_uids": list(self.filtered_uids),
            "failed_uids": list(self.failed_uids),
            "failures": dict(self.failures),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.cursor = int(state["cursor"])
        self.seed = int(state["seed"])
        self.requeued = deque(Prompt(u, bytes(t), a, k, n) for u, t, a, k, n in state["pending"])
        self.outstanding = {}
        self.in_buffer = {}
        self.counts = Counter(state["counts"])
        self.trained_uids = list(state["trained_uids"])
        self.filtered_uids = list(state.get("filtered_uids", []))  # absent in checkpoints before it
        self.failed_uids = list(state.get("failed_uids", []))
        self.failures = Counter(state.get("failures", {}))
