"""Decoder layers under torch.compile (`compile_layers: true`), for the element-wise work between matmuls.

A CPU LoRA step of the default model is about two thirds matmuls; the rest is many small element-wise passes
(norms, rotary, SiLU times up, residual adds, LoRA's scale-and-add, casts), each a trip over memory. Compiling
each decoder layer lets inductor fuse them: measured 1.06-1.14x a step on an AVX-512 bf16 EPYC
(`benchmarks/compile_layers.py`, docs/benchmarks.md), for 20-60 s of compilation in the first step.

What this module arranges, and why:
- `nn.Module.compile` on each layer instance (and the final norm): the layers share one code object, so they
  share compiled graphs; nothing in transformers is patched, and `restore` puts the eager call back.
- `dynamic=True`: one graph for every sequence length from the first call, so a resumed run runs the kernels
  the uninterrupted one ran, whatever lengths either saw first.
- `fallback_random`: random numbers inside the graphs (adapter dropout) come from torch's own generator as in
  eager mode, so they follow the seed and a checkpoint's RNG state exactly.
- Packed attention stays eager behind a graph break, with the spans hidden from dynamo's guards
  (`packed_attention.COMPILED_NAME`); the fused RMSNorm is not installed (inductor fuses the norms itself).
"""

from __future__ import annotations

from typing import Callable

from torch import nn

from deltatune.errors import ConfigError

OPTIONS = {"fallback_random": True}


def compile_targets(model: nn.Module) -> list[nn.Module]:
    """The decoder's layers and its final norm (when it has one)."""
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    layers = getattr(decoder, "layers", None)
    if not isinstance(layers, nn.ModuleList) or not len(layers):
        raise ConfigError(
            f"compile_layers: {type(model).__name__} has no decoder with a `layers` list to compile",
            field="compile_layers",
        )
    norm = getattr(decoder, "norm", None)
    return [*layers, *([norm] if isinstance(norm, nn.Module) else [])]


def install(model: nn.Module) -> Callable[[], None]:
    """Compile each target in place (lazily: the work happens in the first forward); returns `restore`."""
    targets = compile_targets(model)
    for module in targets:
        module.compile(dynamic=True, options=OPTIONS)

    def restore() -> None:
        for module in targets:
            module._compiled_call_impl = None  # nn.Module.compile's own slot: the eager call again

    return restore


def check(cfg, *, distributed: bool) -> None:
    """Combinations not supported with compiled layers, refused before any weights load."""
    if not cfg.compile_layers:
        return
    clash = None
    if distributed:
        clash = "several processes (torchrun)"
    elif cfg.fused_update:
        clash = "fused_update (its hooks run inside backward)"
    elif cfg.gradient_checkpointing:
        clash = "gradient_checkpointing"
    elif cfg.fused_norms == "on":
        clash = "fused_norms: on (compiled layers fuse the norms themselves; use fused_norms: auto)"
    if clash:
        raise ConfigError(f"compile_layers: true cannot run with {clash}", field="compile_layers")
