"""Shared fan-out: the engines' weight groups are spread over the learner ranks.

With one group per engine rooted at learner rank 0, rank 0's link carries the whole model once per engine
(8 times at 32+32). Under a streamed publish every learner rank holds each gathered bucket anyway, so
engine ``k`` is fed by its *owner*, the learner rank the controller picked when the engine said hello
(round robin, rank 0 included). Each engine keeps its own group (learner owner + the engine's TP workers),
so a dead engine still costs only a timeout on its own group.

Per streamed publish (all ranks, from ``Trainer._publish_streamed``):
1. rank 0's controller chooses the targets (``PublishPlan``) and ``share_plan`` broadcasts it over the
   learner world (msgspec bytes in a uint8 tensor);
2. every rank ``RankLinks.prepare``: joins the groups it owns that it has not joined yet (the controller
   serves their stores and has told the engines to join), forgets links of workers that are gone;
3. ``stream_publish`` walks the buckets; ``RankLinks.send`` broadcasts each to the rank's own targets;
4. ``gather_status`` sums every rank's per-target outcome (ok / failed, seconds, bytes) on all ranks, so
   rank 0 can count the ok ones and drop the failed ones.
Rank 0's own groups are the controller's links (joined at hello, as before); ``lookup`` finds them.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import msgspec
import structlog
import torch
import torch.distributed as dist

from async_vapo import distributed
from async_vapo.protocol.messages import PublishPlan
from async_vapo.weight_sync.broadcast import EngineLink
from async_vapo.weight_sync.group import GroupSpec, broadcast

log = structlog.get_logger(__name__)
_ENC = msgspec.msgpack.Encoder()
_DEC = msgspec.msgpack.Decoder(PublishPlan)


def share_plan(plan: PublishPlan | None, device: torch.device | str) -> PublishPlan:
    """Broadcast rank 0's plan (``plan`` is None on the other ranks) over the default process group."""
    if not distributed.active():
        assert plan is not None
        return plan
    raw = _ENC.encode(plan) if plan is not None else b""
    n = torch.tensor([len(raw)], dtype=torch.long, device=device)
    dist.broadcast(n, 0)
    buf = (
        torch.frombuffer(bytearray(raw), dtype=torch.uint8).to(device)
        if plan is not None
        else torch.empty(int(n.item()), dtype=torch.uint8, device=device)
    )
    dist.broadcast(buf, 0)
    return plan if plan is not None else _DEC.decode(bytes(buf.cpu().numpy()))


@dataclass
class Outcome:
    ok: bool = True
    seconds: float = 0.0
    nbytes: int = 0
    error: str = ""


@dataclass
class RankLinks:
    """This learner rank's links to the engines it owns (rank 0: the controller's, via ``lookup``)."""

    rank: int
    lookup: Callable[[str], EngineLink | None] | None = None
    links: dict[str, EngineLink] = field(default_factory=dict)
    _active: list[tuple[int, str, EngineLink | None]] = field(default_factory=list)
    outcomes: dict[int, Outcome] = field(default_factory=dict)

    def prepare(self, plan: PublishPlan) -> None:
        """Join the groups this rank owns and has not joined; a join that fails marks its target failed."""
        live = set(plan.live)
        self.links = {wid: link for wid, link in self.links.items() if wid in live}
        self._active, self.outcomes = [], {}
        for i, t in enumerate(plan.targets):
            if t.owner != self.rank:
                continue
            self.outcomes[i] = Outcome()
            if t.join is not None:
                link = self._join(i, t.worker_id, GroupSpec(*t.join))
            else:
                link = (self.lookup(t.worker_id) if self.lookup is not None else None) or self.links.get(
                    t.worker_id
                )
                if link is None:
                    self._fail(i, t.worker_id, RuntimeError("no link to this engine on its owner rank"))
            self._active.append((i, t.worker_id, link))

    def _join(self, i: int, wid: str, spec: GroupSpec) -> EngineLink | None:
        """Rank 0 of a group whose store the controller serves; the time counts towards the target."""
        link = EngineLink(spec, serve_store=False)
        t0 = time.perf_counter()
        try:
            link.connect()
            self.links[wid] = link
        except Exception as exc:
            self._fail(i, wid, exc)
            return None
        finally:
            self.outcomes[i].seconds += time.perf_counter() - t0
        return link

    @property
    def sending(self) -> bool:
        """This rank has a healthy target: it copies and sends the buckets (the others only gather)."""
        return any(o.ok for o in self.outcomes.values())

    def send(self, flat: torch.Tensor) -> None:
        """One bucket to every healthy target this rank owns (a failed one is skipped from then on)."""
        for i, wid, link in self._active:
            out = self.outcomes[i]
            if not out.ok or link is None or link.pg is None:
                continue
            t0 = time.perf_counter()
            try:
                broadcast(link.pg, flat, root=0)
                out.nbytes += flat.numel() * flat.element_size()
            except Exception as exc:
                self._fail(i, wid, exc)
            out.seconds += time.perf_counter() - t0

    def _fail(self, i: int, wid: str, exc: BaseException) -> None:
        self.outcomes[i].ok = False
        self.outcomes[i].error = repr(exc)[:200]
        self.links.pop(wid, None)
        log.error("weight stream to an engine failed", worker=wid, rank=self.rank, error=repr(exc)[:200])


def gather_status(plan: PublishPlan, mine: dict[int, Outcome], device: torch.device | str) -> list[Outcome]:
    """Every target's outcome on every rank: [failed, seconds, bytes] per target, summed over ranks
    (each target has exactly one owner)."""
    t = torch.zeros(len(plan.targets), 3, dtype=torch.float64, device=device)
    for i, o in mine.items():
        t[i] = torch.tensor([0.0 if o.ok else 1.0, o.seconds, float(o.nbytes)], dtype=torch.float64)
    if distributed.active():
        dist.all_reduce(t)
    rows: list[Any] = t.cpu().tolist()
    return [
        Outcome(ok=row[0] == 0, seconds=row[1], nbytes=int(row[2]), error=mine[i].error if i in mine else "")
        for i, row in enumerate(rows)
    ]
