"""Staleness-aware buffer: admission control, prompt ledger, groups in and batches out."""

from async_vapo.buffer.buffer import GroupBuffer, SamplingStarved
from async_vapo.buffer.ledger import PromptLedger, Requeue
from async_vapo.buffer.staleness import StalenessManager, VersionSource

__all__ = ["GroupBuffer", "PromptLedger", "Requeue", "SamplingStarved", "StalenessManager", "VersionSource"]
