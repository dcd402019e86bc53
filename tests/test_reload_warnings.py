"""vLLM's "Failed to load weights" after a reload: dropped for the layers that never get checkpoint
weights (rotary embeddings, a tied LM head), kept for any other layer (a weight the learner missed)."""

from __future__ import annotations

import logging

from async_vapo.rollout.weights import _RELOAD_LOGGER, _ExpectedMissing


def _record(layer: str, msg: str = "%s: Failed to load weights") -> logging.LogRecord:
    return logging.LogRecord(_RELOAD_LOGGER, logging.WARNING, __file__, 1, msg, (layer,), None)


def test_expected_layers_are_dropped_and_counted_others_kept():
    f = _ExpectedMissing({"ParallelLMHead"})
    assert not f.filter(_record("RotaryEmbedding"))
    assert not f.filter(_record("Llama3RotaryEmbedding"))
    assert not f.filter(_record("ParallelLMHead"))
    assert f.filter(_record("QKVParallelLinear"))  # a real miss stays visible
    assert f.filter(_record("RotaryEmbedding", "%s: Delayed processing"))  # other messages untouched
    assert f.dropped == 3
    untied = _ExpectedMissing(set())  # an untied head gets its own weight: missing it is a problem
    assert untied.filter(_record("ParallelLMHead"))


def test_the_filter_works_on_the_logger_vllm_uses(caplog):
    logger = logging.getLogger(_RELOAD_LOGGER)
    f = _ExpectedMissing({"ParallelLMHead"})
    logger.addFilter(f)
    try:
        with caplog.at_level(logging.WARNING, logger=_RELOAD_LOGGER):
            for layer in ("RotaryEmbedding", "ParallelLMHead", "RowParallelLinear"):
                logger.warning("%s: Failed to load weights", layer)
    finally:
        logger.removeFilter(f)
    assert [r.getMessage() for r in caplog.records] == ["RowParallelLinear: Failed to load weights"]
