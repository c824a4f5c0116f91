"""deltatune: instruction finetuning with delta-tuning methods, loss masking, and measurement.

The public Python API is the names in `__all__` (docs/api.md); everything else is private and may
change. `import deltatune` is cheap: torch and transformers load on the first use of a name.

    model, tokenizer = deltatune.load_model(None)              # the default model
    adapted = deltatune.apply(model, "lora", rank=8, alpha=16)  # changes `model` in place
    adapted.print_trainable_parameters()
    data = deltatune.prepare("train.jsonl", tokenizer, policy="instruction")
    collator = deltatune.DataCollator(tokenizer)                # for transformers' Trainer or TRL
"""

from __future__ import annotations

import types
from importlib import import_module
from typing import Any

__version__ = "0.1.0"

# public name -> the private module that defines it
_EXPORTS = {
    "apply": "deltatune.api.model",
    "AdaptedModel": "deltatune.api.model",
    "load_adapter": "deltatune.api.model",
    "load_model": "deltatune.api.model",
    "prepare": "deltatune.api.data",
    "DataCollator": "deltatune.data.collator",
    "weighted_loss": "deltatune.api.trainer",
    "WeightedLossTrainer": "deltatune.api.trainer",
    "TrainConfig": "deltatune.config",
    "UserError": "deltatune.errors",
    "ConfigError": "deltatune.errors",
    "DataError": "deltatune.errors",
}

__all__ = sorted([*_EXPORTS, "train", "evaluate"])


class _CallablePackage(types.ModuleType):
    """`deltatune.train` and `deltatune.evaluate` are both subpackages (the engine) and the public
    functions of the same name: calling the package calls `deltatune.api.run.<name>`. A plain
    function in their place would hide the subpackages from dotted look-ups (`deltatune.train.loop`)."""

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        run = import_module("deltatune.api.run")
        return getattr(run, self.__name__.rpartition(".")[2])(*args, **kwargs)


for _name in ("train", "evaluate"):  # both packages' __init__ are docstrings: importing them is free
    import_module(f"{__name__}.{_name}").__class__ = _CallablePackage
del _name


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'deltatune' has no attribute '{name}'")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
