"""Where a run's processes go: nodes and their ranks, device placement, memory estimates, rendezvous."""

from async_vapo.cluster.memory import MemoryPlan, ModelShape, estimate_memory, model_shape
from async_vapo.cluster.nodes import NodeInfo, node_info
from async_vapo.cluster.placement import Layout, NodeShare, engine_core_binding, layout
from async_vapo.cluster.rendezvous import Endpoints, RunStore

__all__ = [
    "Endpoints",
    "Layout",
    "MemoryPlan",
    "ModelShape",
    "NodeInfo",
    "NodeShare",
    "RunStore",
    "engine_core_binding",
    "estimate_memory",
    "layout",
    "model_shape",
    "node_info",
]
