"""Delta-tuning methods behind one protocol (see base.py)."""

from deltatune.methods.base import (
    DeltaLinear,
    Method,
    MethodSpec,
    WeightDeltaMethod,
    get_method,
    method_names,
    register,
)
from deltatune.methods.options import Option

__all__ = [
    "DeltaLinear",
    "Method",
    "MethodSpec",
    "Option",
    "WeightDeltaMethod",
    "get_method",
    "method_names",
    "register",
]
