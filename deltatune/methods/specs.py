"""One function turns a run configuration into method specs: `train`, `eval`/`forgetting` and `plan`
all call `specs_from_config`, so they agree on how a combination is written ('lora+bitfit'), on the
defaults (TrainConfig's: alpha 16, rank 8, ...) and on where options go.

`method_options` is either one mapping for all the methods, or per method, keyed by name
(`{"lora": {...}, "bitfit": {...}}`). A flat mapping given to a combination goes to each method whose
schema has the option; an option no method of the combination has is a one-line error.
"""

from __future__ import annotations

from typing import Any, Mapping

from deltatune.errors import ConfigError
from deltatune.methods.base import Method, MethodSpec, get_method

SPEC_FIELDS = ("targets", "rank", "alpha", "dropout", "rslora")


def split_methods(method: str) -> list[str]:
    """'lora+bitfit' -> ['lora', 'bitfit']."""
    return [m.strip() for m in str(method or "").split("+") if m.strip()]


def _defaults() -> dict[str, Any]:
    from deltatune.config import TrainConfig

    return {k: TrainConfig.model_fields[k].default for k in ("method", *SPEC_FIELDS)}


def per_method_options(names: list[str], options: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    nested = {k for k, v in options.items() if k in names and isinstance(v, dict)}
    flat = {k: v for k, v in options.items() if k not in nested}
    out = {n: dict(options[n]) if n in nested else {} for n in names}
    if len(names) == 1:
        out[names[0]].update(flat)
        return out
    for key, value in flat.items():
        takers = [n for n in names if key in get_method(n).options_schema]
        if not takers:
            raise ConfigError(
                f"option '{key}' belongs to none of the methods {'+'.join(names)}; give options per "
                f"method as method_options: {{name: {{...}}}}",
                field=f"method_options.{key}",
            )
        for n in takers:
            out[n].setdefault(key, value)
    return out


def specs_from_config(config: Any) -> list[MethodSpec]:
    """MethodSpecs from a TrainConfig, its dict (config.yaml) or any mapping with the same keys; missing
    keys take TrainConfig's defaults. Unknown method names are a one-line error listing the known ones."""
    if hasattr(config, "model_dump"):
        config = config.model_dump()
    values = {**_defaults(), **{k: v for k, v in dict(config).items() if v is not None}}
    names = split_methods(values["method"])
    if not names:
        raise ConfigError("no method given", field="method")
    for n in names:
        get_method(n)  # unknown -> ConfigError listing the methods
    options = per_method_options(names, values.get("method_options") or {})
    common = {k: values[k] for k in SPEC_FIELDS}
    return [MethodSpec(name=n, **common, options=options[n]) for n in names]


def build_methods(specs: list[MethodSpec]) -> list[Method]:
    """Method objects for `specs` (options checked), e.g. to read capabilities before a model exists."""
    return [get_method(s.name)(s) for s in specs]


def with_tokenizer(specs: list[MethodSpec], tokenizer: Any) -> list[MethodSpec]:
    """`specs` with the model's tokenizer given to each method that takes one (prompt and prefix tuning
    initialised from a text or class labels): a config can name the text but cannot hold the tokenizer."""
    from dataclasses import replace

    return [
        replace(s, options={**s.options, "tokenizer": tokenizer})
        if "tokenizer" in get_method(s.name).options_schema and s.options.get("tokenizer") is None
        else s
        for s in specs
    ]


def unused_fields(names: list[str], given: set[str] | frozenset[str], values: Mapping[str, Any]) -> list[str]:
    """One line for each shared field the user set (`given`) that no method of the combination reads: it
    changes nothing (`adapter` sizes itself with its `bottleneck` option, `ia3` has no rank), so saying so
    beats training quietly with something other than what was asked. `values` gives the field's value."""
    combination = "+".join(names)
    readers = set().union(*(get_method(n).shared_fields for n in names))
    lines = []
    for key in SPEC_FIELDS:
        if key in given and key not in readers:
            lines.append(f"{key} {values[key]!r} is not used by {combination}: it changes nothing")
    return lines
