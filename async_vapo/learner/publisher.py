"""New weights from the learner ranks to the engines: one object per ``train.publish`` mode.

- ``SnapshotPublisher``: one copy of the model on rank 0, filled bucket by bucket (ZeRO-3: each parameter
  gathered on its own and released, never the whole model on top of that copy), handed to the controller,
  which sends it to every engine and keeps it for engines that join later.
- ``StreamedPublisher``: every rank walks the same bucket plan, gathering one bucket at a time, and sends
  each bucket to the engines it owns (``weight_sync.fanout``); nothing is kept, so engines that join get
  the next publish, which rank 0 asks for as soon as one is behind (``engines_behind``).

Both are collective (every rank calls ``publish``): ZeRO-3's gathers are. Under LoRA both send either the
merged weights under the base model's names (``learner.lora.published``) or, with
``model.lora_publish=adapter``, the adapter's matrices alone under their PEFT names
(``learner.lora.published_adapter``; the engines load them into vLLM's LoRA slot).
"""

from __future__ import annotations

from typing import Any

import torch

from async_vapo.learner.lora import published, published_adapter
from async_vapo.weight_sync.broadcast import Snapshot
from async_vapo.weight_sync.fanout import RankLinks, gather_status, share_plan
from async_vapo.weight_sync.publish import StreamPlan, stream_publish


class Publisher:
    """What both modes share: the bucket plan of the policy's published weights, built once."""

    keeps_snapshot = False  # whether a resumed run must publish before any engine asks (the snapshot)

    def __init__(
        self,
        adapter: bool,
        policy: torch.nn.Module,
        bucket_bytes: int,
        controller: Any | None,
        rank: int,
        world: int,
        device: torch.device,
    ) -> None:
        self.adapter = adapter  # publish the policy's LoRA adapter alone
        self.policy, self.bucket_bytes, self.controller = policy, bucket_bytes, controller
        self.rank, self.world, self.device = rank, world, device
        self._plan: StreamPlan | None = None

    @property
    def plan(self) -> StreamPlan:
        if self._plan is None:
            named = published_adapter(self.policy) if self.adapter else published(self.policy)
            self._plan = StreamPlan.of(named, self.bucket_bytes)
        return self._plan

    def publish(self, version: int) -> None:
        raise NotImplementedError

    def engines_behind(self) -> bool:
        """Rank 0: whether engines wait for weights that only a new publish can give them."""
        return False


class SnapshotPublisher(Publisher):
    keeps_snapshot = True

    def publish(self, version: int) -> None:
        if self.controller is None and self.world == 1:
            return
        flats: list[torch.Tensor] = []
        keep = (lambda t: flats.append(t.clone())) if self.controller is not None else None
        stream_publish(self.plan, keep, self.device)
        if self.controller is not None:
            self.controller.publish(Snapshot(version, self.plan.buckets, flats))


class StreamedPublisher(Publisher):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.links = RankLinks(self.rank)  # the engines this rank feeds

    def publish(self, version: int) -> None:
        ctl = self.controller
        targets, plan = ctl.begin_stream(version, self.plan.buckets) if ctl else ([], None)
        plan = share_plan(plan, self.device)
        if not plan.targets:  # no engine can take it now (joining ones get the next publish)
            return
        if ctl is not None:  # rank 0's groups are the controller's links
            own = {t.worker.worker_id: t.worker.link for t in targets}
            self.links.lookup = own.get
        self.links.prepare(plan)
        stream_publish(self.plan, self.links.send if self.links.sending else None, self.device)
        outcomes = gather_status(plan, self.links.outcomes, self.device)
        if ctl is not None:
            ctl.end_stream(version, targets, outcomes)

    def engines_behind(self) -> bool:
        return self.controller is not None and self.controller.engines_behind()


def make_publisher(
    streamed: bool,
    adapter: bool,
    policy: torch.nn.Module,
    bucket_bytes: int,
    controller: Any | None,
    rank: int,
    world: int,
    device: torch.device,
) -> Publisher:
    """``train.publish``'s publisher (``streamed``: ``TrainConfig.streams_publish``) of the policy's
    weights, or of its LoRA adapter alone (``adapter``: ``model.lora_publish=adapter``)."""
    cls = StreamedPublisher if streamed else SnapshotPublisher
    return cls(adapter, policy, bucket_bytes, controller, rank, world, device)
