"""Rollout: vLLM engines sampling groups, and the worker extension that loads new weights."""
