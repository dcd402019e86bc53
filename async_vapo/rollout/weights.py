"""vLLM worker extension that receives new weights from the learner and loads them in place.

Loaded into every vLLM worker with ``worker_extension_cls="async_vapo.rollout.weights.WeightReceiver"``
and driven by ``collective_rpc``. Tensors never travel as RPC arguments (they would be serialised); only
the bucket metadata does, the data comes over the dedicated process group.

Tied weights: vLLM ties ``lm_head.weight`` to ``embed_tokens.weight`` by sharing one Parameter object, and the
in-place reload materialises a fresh Parameter for the embedding, silently untying the head (it kept the
old weights, and on CPU its packed GEMM too). We record the tied groups before the first reload, re-tie them
after every reload and rebuild the derived kernels; the
test that compares the engine's log-probs with transformers catches a regression.

Warnings: after every reload vLLM's layer-wise loader warns ``<Layer>: Failed to load weights`` for each
layer that has loadable tensors but received none, and puts the layer's previous tensors back. Three such
cases are expected and harmless: rotary embeddings (their ``cos_sin_cache`` is computed from the config,
never part of a checkpoint), an LM head tied to the embedding (the checkpoint has no ``lm_head.weight``;
we re-tie it to the new embedding, see above), and, on a tensor-parallel rank, a vocabulary shard that
holds only padding rows (vLLM pads the vocabulary to a multiple of 64 before splitting it: at TP 2 a
vocabulary of 17 tokens leaves rank 1 no real row). ``_ExpectedMissing`` drops exactly those records and
counts them; the warning for any other layer (a weight the learner did not send) still reaches the log.

CPU note: vLLM's CPU backend repacks linear weights after loading, so ``model.load_weights`` on the live
model fails; ``model_runner.reload_weights(weights_iterator=..., is_checkpoint_format=True)`` redoes the
post-load processing and is what we call on every backend.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator
from typing import Any

from async_vapo.weight_sync.buckets import BucketMeta, FlatPool, bucket_nbytes, empty_flat, unpack
from async_vapo.weight_sync.group import GroupSpec, broadcast, join_group

POOL_MAX_BYTES = 1 << 30  # receive buffers kept between updates only for models up to 1 GiB
_RELOAD_LOGGER = "vllm.model_executor.model_loader.reload.layerwise"


class _ExpectedMissing(logging.Filter):
    """Drops vLLM's "Failed to load weights" warning for layers that never get checkpoint weights (see
    the module docstring): rotary embeddings and the layers tied to another layer's weight."""

    def __init__(self, tied_layers: set[str]) -> None:
        super().__init__()
        self.tied_layers = tied_layers
        self.dropped = 0

    def filter(self, record: logging.LogRecord) -> bool:
        if record.msg != "%s: Failed to load weights" or not record.args:
            return True
        layer = str(record.args[0] if isinstance(record.args, tuple) else record.args)
        if layer.endswith("RotaryEmbedding") or layer in self.tied_layers:
            self.dropped += 1
            return False
        return True


class WeightReceiver:
    """Mixed into vLLM's worker class; ``self`` is the worker (``self.model_runner``, ``self.rank``)."""

    _weight_pg: Any = None
    _tied: list[list[tuple[Any, str]]] | None = None

    def init_weight_group(
        self, host: str, port: int, world_size: int, backend: str, timeout_s: float, store_file: str = ""
    ) -> int:
        rank = 1 + int(getattr(self, "rank", 0))
        model = self.model_runner.get_model()  # type: ignore[attr-defined]
        self._tied = _tied_groups(model)
        tied = {type(m).__name__ for g in self._tied for m, _ in g[1:]}
        self._quiet_expected_warnings(tied | _padding_only_shards(model))
        spec = GroupSpec(host, port, world_size, backend, timeout_s, store_file)
        self._weight_pg = join_group(spec, rank, serve=False)
        return rank

    def receive_weights(self, buckets: list[BucketMeta]) -> float:
        """Receive the buckets while vLLM loads them (a bucket is received when the loader asks for its
        first tensor), return the seconds spent.

        Every vLLM worker of the engine (each tensor-parallel rank) receives the full checkpoint-format
        tensors and its loader keeps its shard. Memory: small models keep their receive buffers from one
        update to the next (``FlatPool``, no allocation after the first update); above
        ``POOL_MAX_BYTES`` each bucket gets a fresh buffer that is freed once vLLM has loaded the layers
        it holds, so the engine never holds a second copy of a large model.
        """
        if self._weight_pg is None:
            raise RuntimeError("init_weight_group was not called on this worker")
        t0 = time.perf_counter()
        received = self._stream(buckets)
        self.model_runner.reload_weights(weights_iterator=received, is_checkpoint_format=True)  # type: ignore[attr-defined]
        for _ in received:  # every rank of the group must take part in every bucket's broadcast
            pass
        for group in self._tied or []:
            canonical = getattr(group[0][0], group[0][1])
            for module, name in group[1:]:
                setattr(module, name, canonical)
                # kernels derived from the weight (the CPU backend's packed GEMM for the LM head) are rebuilt
                quant = getattr(module, "quant_method", None)
                if quant is not None and hasattr(quant, "process_weights_after_loading"):
                    quant.process_weights_after_loading(module)
        return time.perf_counter() - t0

    def receive_adapter(
        self, buckets: list[BucketMeta], peft_config: dict[str, Any], directory: str, name: str, lora_id: int
    ) -> tuple[float, str]:
        """Receive the policy's LoRA adapter (``model.lora_publish=adapter``: PEFT-named matrices, see
        ``weight_sync.adapter``) and put it in vLLM's LoRA slot ``lora_id`` in place of the one there;
        returns the seconds spent and the adapter's directory.

        The base weights never change. vLLM loads adapters from a directory, so the tensors are written
        to ``directory/tp<rank>`` (``adapter_model.safetensors`` + ``adapter_config.json``, replaced
        atomically: vLLM reloads from there should it ever drop the slot) and loaded with
        ``load_inplace``: the slot's tensors are replaced, so requests in flight (``keep`` mode) continue
        under the new adapter as they do under new weights.
        """
        import json
        import os
        from pathlib import Path

        from safetensors.torch import save_file
        from vllm.lora.request import LoRARequest

        if self._weight_pg is None:
            raise RuntimeError("init_weight_group was not called on this worker")
        t0 = time.perf_counter()
        tensors = {key: t.to("cpu").contiguous() for key, t in self._stream(buckets)}
        out = Path(directory) / f"tp{int(getattr(self, 'rank', 0))}"
        out.mkdir(parents=True, exist_ok=True)
        save_file(tensors, str(out / "adapter_model.safetensors.tmp"))
        os.replace(out / "adapter_model.safetensors.tmp", out / "adapter_model.safetensors")
        (out / "adapter_config.json.tmp").write_text(json.dumps(peft_config))
        os.replace(out / "adapter_config.json.tmp", out / "adapter_config.json")
        self.model_runner.add_lora(LoRARequest(name, lora_id, str(out), load_inplace=True))  # type: ignore[attr-defined]
        return time.perf_counter() - t0, str(out)

    def adaptable_modules(self) -> list[str]:
        """The layer names (last name: ``q_proj``, ...) an adapter for this engine's model may target:
        the names vLLM's LoRA loader accepts (a packed layer, ``qkv_proj``, by the names it packs). An
        adapter with any other target fails in vLLM's loader at every update."""
        manager = self.model_runner.lora_manager._adapter_manager  # type: ignore[attr-defined]
        packed = manager.packed_modules_mapping
        names: set[str] = set()
        for module in manager.supported_lora_modules:
            names.update(packed.get(module, [module]))
        return sorted(names)

    def _stream(self, buckets: list[BucketMeta]) -> Iterator[tuple[str, Any]]:
        """``(name, tensor)`` of every bucket in turn, each bucket received (a broadcast from the learner)
        when its first tensor is asked for."""
        device = self._device()
        if getattr(self, "_flat_pool", None) is None:
            self._flat_pool = FlatPool()
        pooled = sum(bucket_nbytes(b) for b in buckets) <= POOL_MAX_BYTES
        if not pooled:
            self._flat_pool.clear()
        for i, bucket in enumerate(buckets):
            flat = self._flat_pool.get(i, bucket, device) if pooled else empty_flat(bucket, device)
            broadcast(self._weight_pg, flat, root=0)
            yield from unpack(bucket, flat)

    def _quiet_expected_warnings(self, tied_layers: set[str]) -> None:
        logger = logging.getLogger(_RELOAD_LOGGER)
        for f in [f for f in logger.filters if isinstance(f, _ExpectedMissing)]:
            logger.removeFilter(f)  # a rejoin: the tied layers are recomputed
        logger.addFilter(_ExpectedMissing(tied_layers))

    def close_weight_group(self) -> None:
        """Leave the group (its learner is gone): abort it, which frees NCCL's communicator."""
        pg, self._weight_pg = self._weight_pg, None
        if pg is not None:
            with contextlib.suppress(Exception):
                pg.abort()

    def _device(self) -> Any:
        dev = getattr(self, "device", None)
        return dev if dev is not None else "cpu"


def _tied_groups(model: Any) -> list[list[tuple[Any, str]]]:
    """Groups of (module, attribute) that share one Parameter object, in module order."""
    by_id: dict[int, list[tuple[Any, str]]] = {}
    for _, module in model.named_modules():
        for name, param in module.named_parameters(recurse=False):
            by_id.setdefault(id(param), []).append((module, name))
    return [g for g in by_id.values() if len(g) > 1]


def _padding_only_shards(model: Any) -> set[str]:
    """Class names of the vocabulary-parallel layers whose shard on this rank holds no checkpoint row."""
    out = set()
    for _, module in model.named_modules():
        idx = getattr(module, "shard_indices", None)
        if idx is not None and idx.num_org_elements == 0 and idx.num_added_elements == 0:
            out.add(type(module).__name__)
    return out
