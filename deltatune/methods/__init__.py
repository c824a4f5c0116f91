"""Delta-tuning methods behind one protocol (see base.py)."""

from deltatune.methods.base import DeltaLinear, Method, MethodSpec, get_method, method_names, register

__all__ = ["DeltaLinear", "Method", "MethodSpec", "get_method", "method_names", "register"]
