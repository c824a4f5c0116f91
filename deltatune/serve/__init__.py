"""Serving many adapters on one frozen base: per-row adapter routing, a batched generation engine, and an
OpenAI-compatible HTTP server (docs/serving.md)."""

from deltatune.serve.adapters import SERVABLE_METHODS, MultiAdapterLinear, MultiAdapterModel
from deltatune.serve.engine import Engine, GenRequest, GenResult, SamplingParams

__all__ = [
    "Engine",
    "GenRequest",
    "GenResult",
    "MultiAdapterLinear",
    "MultiAdapterModel",
    "SamplingParams",
    "SERVABLE_METHODS",
]
