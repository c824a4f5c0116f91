"""The KV cache's name in transformers' calls and outputs, which depends on the version.

transformers renamed the cache argument from `past_key_values` to `cache`: the decoder body's in 5.24 (the
causal LM then passes `cache=None` explicitly, so a `past_key_values` put next to it is ignored), the causal
LM's forward and its output field in 5.25 (the old names still work there, with a warning, until 5.40).
`cache_key(module)` reads the name from the module's own forward signature, so code that passes or reads a
cache (the virtual-token methods' hooks, shared-context choice scoring, the serving engine) works on every
version from 5.23 on without version checks.
"""

from __future__ import annotations

import inspect
from typing import Any

from torch import nn

_CACHE_NAMES = ("cache", "past_key_values")
_cache_key_by_class: dict[type, str] = {}


def cache_key(module: nn.Module) -> str:
    """The name of `module.forward`'s cache argument (and its output's cache field) in this version."""
    cls = type(module)
    if cls not in _cache_key_by_class:
        params = inspect.signature(cls.forward).parameters
        _cache_key_by_class[cls] = "cache" if "cache" in params else "past_key_values"
    return _cache_key_by_class[cls]


def takes_cache(module: nn.Module) -> bool:
    """Whether `module.forward` takes a cache under either name."""
    params = inspect.signature(type(module).forward).parameters
    return any(name in params for name in _CACHE_NAMES)


def cache_kwargs(module: nn.Module, cache: Any) -> dict[str, Any]:
    """`{name: cache}` to pass to `module(...)`."""
    return {cache_key(module): cache}


def take_cache(module: nn.Module, kw: dict[str, Any]) -> Any:
    """The cache the caller passed (under either name); both names are removed from `kw`."""
    key = cache_key(module)
    found = None
    for name in (key,) + tuple(n for n in _CACHE_NAMES if n != key):
        value = kw.pop(name, None)
        if found is None and value is not None:
            found = value
    return found


def put_cache(module: nn.Module, kw: dict[str, Any], cache: Any) -> None:
    kw[cache_key(module)] = cache


def output_cache(module: nn.Module, output: Any) -> Any:
    """The cache in `module`'s output (None when it returned none)."""
    return getattr(output, cache_key(module), None)


def drop_output_cache(module: nn.Module, output: Any) -> None:
    setattr(output, cache_key(module), None)


def cache_length(past: Any) -> int:
    return 0 if past is None else int(past.get_seq_length())
