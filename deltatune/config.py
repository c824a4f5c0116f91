"""Typed run configuration: a YAML file plus `--set key=value` overrides and plain flags, validated.

A wrong key or value becomes one line naming it and what is allowed. The resolved configuration
is saved beside a run's outputs (config.yaml) so that every result can be traced to its settings.
"""

from __future__ import annotations

import difflib
import re
import types
import typing
from contextvars import ContextVar
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from deltatune.errors import ConfigError

_FROM_FILE: ContextVar[bool] = ContextVar("deltatune_config_from_file", default=False)


class TrainConfig(BaseModel):
    # allow_inf_nan=False: `lr: inf` trained NaN weights into final/, `epochs: inf` crashed with a traceback
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)

    def __init__(self, **data: Any) -> None:
        """From Python (`TrainConfig(rank=8)`): a wrong key or value is the one-line ConfigError a file gets (it
        was pydantic's multi-line ValidationError); `load_config` names the file instead."""
        try:
            super().__init__(**data)
        except ValidationError as err:
            if _FROM_FILE.get():  # load_config explains it, naming the file or the command line
                raise
            raise _explain(err, "TrainConfig") from None

    # model
    model: str | None = Field(None, description="transformers folder, hub id, .gguf file; empty = default model")
    trust_remote_code: bool = False
    # data
    data: str | None = Field(None, description="training data file (JSONL/JSON/Parquet/CSV)")
    data_format: Literal["auto", "alpaca", "chat", "prompt", "text"] = Field(
        "auto", description="auto | alpaca | chat | prompt (prompt/completion; 'prompt-completion' also) | text"
    )
    column_map: dict[str, str] = Field(
        default_factory=dict, description="file column -> field, e.g. question: instruction"
    )
    template: Literal["auto", "chatml", "alpaca", "tokenizer", "raw"] = "auto"  # auto: the model's own chat template
    policy: str = Field(
        "response",
        description="loss policy: response | instruction | no-boilerplate | all | weighted:L; two phases: 'A->B@STEPS'",
    )
    loss_reduction: Literal["token", "example", "count"] = Field(
        "token",
        description="token: sum(w*nll)/sum(w) over the whole accumulated batch, so long examples weigh "
        "more; example: each example's weighted mean first, then the mean over examples "
        "(what the Instruction Modelling paper's code does with micro-batch 1); count: sum(w*nll) over the "
        "number of tokens that carry any weight (the spec's token-count normaliser: a fractional weight then "
        "lowers the loss's scale, not only the instruction's share)",
    )
    system_prompt: str | None = None
    skip_bad: bool = False
    seq_len: int = Field(512, ge=8, description="longest example, in tokens (longer ones are truncated or dropped)")
    pack_len: int | None = Field(
        None,
        ge=8,
        description="length of a packed row (default: seq_len); rows of several "
        "seq_len hold more examples and waste less on padding",
    )
    overflow: Literal["truncate", "drop"] = "truncate"
    packing: bool = True
    attention: Literal["auto", "mask", "packed"] = Field(
        "auto",
        description="how packed examples are kept apart: packed = the micro-batch's examples end to end "
        "without padding, attention example by example (fastest on CPU; on CUDA in bf16/fp16, PyTorch's "
        "variable-length flash attention); mask = rows padded to the row length, SDPA with a block-diagonal "
        "mask; auto = packed on CPU where the model and methods allow it, mask otherwise (on CUDA until the "
        "GPU comparison in docs/benchmarks.md is measured)",
    )
    eval_data: str | None = None
    eval_fraction: float = Field(0.05, ge=0.0, lt=1.0, description="share of `data` held out for evaluation")
    eval_max_examples: int = Field(
        256, ge=1, description="at most this many held-out examples taken from `data`; `eval_data` is used whole"
    )
    # method
    method: str = Field("lora", description="lora | full | dora | mora | ... ; combine with '+', e.g. lora+bitfit")
    targets: str = "all-linear"
    rank: int = Field(8, ge=1)
    alpha: float = Field(16.0, gt=0)
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    rslora: bool = False
    method_options: dict[str, Any] = Field(default_factory=dict)
    # optimisation
    lr: float = Field(2e-4, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    betas: tuple[float, float] = (0.9, 0.999)
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    warmup_steps: int | None = Field(None, ge=0)
    warmup_ratio: float = Field(0.03, ge=0, le=1)
    epochs: float = Field(1.0, gt=0)
    steps: int | None = Field(None, ge=1, description="optimizer steps; overrides epochs")
    batch_size: int = Field(4, ge=1)
    grad_accum: int = Field(1, ge=1)
    max_grad_norm: float | None = Field(1.0, gt=0)
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    gradient_checkpointing: bool = False
    fused_norms: Literal["auto", "on", "off"] = Field(
        "auto",
        description="run Llama-style RMSNorms as one torch.compile'd kernel (5x faster per norm on CPU; "
        "needs a C++ compiler); auto = on CPU, falling back to transformers' norms if compiling fails",
    )
    compile_layers: bool | Literal["auto"] = Field(
        "auto",
        description="torch.compile every decoder layer (inductor fuses the element-wise work between the "
        "matmuls; packed attention stays eager): 1.06-1.24x a CPU LoRA step after 11-51 s of compilation, not "
        "bitwise equal to eager; single process, without LOMO or gradient checkpointing; auto = on for "
        "single-process CPU runs of at least 500k planned tokens (where compiling pays back) with a method "
        "tested under it (lora, rslora, dora, mora, qlora, full, prefix)",
    )
    keep_freed_memory: Literal["auto", "on", "off"] = Field(
        "auto",
        description="glibc keeps the memory a step frees for the next step instead of handing it back to the "
        "kernel (no page faults on fresh pages): full finetuning 1.03-1.13x on CPU for 350-500 MiB more peak "
        "RSS, LoRA unchanged (docs/benchmarks.md); auto = on when training on CPU; Linux with glibc only",
    )
    fused_update: bool | Literal["lomo", "fused-adamw"] = Field(
        False,
        description="update each weight inside backward: lomo (Lv et al.: plain SGD, no optimizer state, "
        "global-norm clipping by two backward passes; true means lomo) or fused-adamw (AdamW "
        "state, each tensor clipped on its own; AdaLomo-like)",
    )
    loss_chunk: int = Field(1024, ge=16, description="tokens per LM-head + cross-entropy chunk")
    moe_aux_loss: float = Field(
        0.01,
        ge=0,
        description="upcycled models: weight of the Switch load-balancing loss "
        "E*sum(f_e*P_e), averaged over MoE layers (docs/upcycling.md)",
    )
    moe_z_loss: float = Field(
        0.0, ge=0, description="upcycled models: weight of the router z-loss mean(logsumexp(router logits)^2)"
    )
    # run
    seed: int = 0
    output: str = "runs/latest"
    save_every: int | None = Field(None, ge=1)
    snapshot_every: int | None = Field(
        None,
        ge=1,
        description="keep the trainable weights every N steps in "
        "snapshots/ (never pruned), for `deltatune analyze` over time",
    )
    eval_every: int | None = Field(None, ge=1)
    log_every: int = Field(10, ge=1)
    resume: bool = False
    overwrite: bool = Field(False, description="replace the run in `output` (never the model or data being read)")
    device: str = "auto"
    num_threads: int | None = Field(None, ge=1)

    @field_validator("data_format", mode="before")
    @classmethod
    def _prompt_completion_is_prompt(cls, value):
        """The reader's name for prompt/completion records is `prompt`; runs recorded as `prompt-completion` resume."""
        return "prompt" if value == "prompt-completion" else value

    @field_validator("betas")
    @classmethod
    def _check_betas(cls, betas: tuple[float, float]) -> tuple[float, float]:
        if not all(0.0 <= b < 1.0 for b in betas):  # else AdamW refused them only after the model loaded
            raise ValueError(f"each beta must be in [0, 1), got {list(betas)}")
        return betas

    @model_validator(mode="after")
    def _check(self) -> "TrainConfig":
        if self.pack_len is not None and self.pack_len < self.seq_len:
            raise ValueError(f"pack_len ({self.pack_len}) must be at least seq_len ({self.seq_len})")
        if self.fused_update and self.grad_accum != 1:
            raise ValueError("fused_update updates weights inside backward, so it needs grad_accum 1")
        return self

    @property
    def row_len(self) -> int:
        """Tokens per packed row (or the padding limit of unpacked batches)."""
        return self.pack_len or self.seq_len

    @property
    def method_names(self) -> list[str]:
        return [m.strip() for m in self.method.split("+") if m.strip()]


_BOOL = {"true": True, "false": False, "yes": True, "no": False, "1": True, "0": False}


class _Yaml12Loader(yaml.SafeLoader):
    """safe_load with YAML 1.2 booleans: only true/false are booleans, so `off`, `no`, `on`, `yes`
    stay text (`fused_norms: off` means the word); bool keys still accept them (pydantic reads them).
    A key given twice in one mapping is an error, as YAML 1.2 says (PyYAML kept the last silently)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        first: dict[Any, int] = {}
        for key_node, _ in node.value:  # the mapping's own keys; `<<` merges may be overridden
            if not isinstance(key_node, yaml.ScalarNode) or key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node)
            line = key_node.start_mark.line + 1
            if key in first:
                raise yaml.constructor.ConstructorError(
                    None, None, f"'{key}' appears twice (first on line {first[key]})", key_node.start_mark
                )
            first[key] = line
        return super().construct_mapping(node, deep=deep)


_Yaml12Loader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Yaml12Loader.add_implicit_resolver(
    "tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF")
)
# YAML 1.2 floats without a dot (`lr: 1e-4`, `steps: 1e3`); YAML 1.1 wants `1.0e-4` and read them as text
_Yaml12Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float", re.compile(r"^[-+]?[0-9]+[eE][-+]?[0-9]+$"), list("-+0123456789")
)


def load_yaml(text: str) -> Any:
    """YAML as configs are read everywhere (safe, YAML 1.2 booleans)."""
    return yaml.load(text, Loader=_Yaml12Loader)  # noqa: S506 (a SafeLoader subclass)


def _is_text(annotation: Any) -> bool:
    """True for str, str | None and Literal of strings: a value for such a key is text as typed."""
    if annotation is str:
        return True
    args = typing.get_args(annotation)
    if typing.get_origin(annotation) is Literal:
        return all(isinstance(a, str) for a in args)
    if typing.get_origin(annotation) not in (typing.Union, types.UnionType):
        return False
    return all(a is type(None) or _is_text(a) for a in args) and any(a is not type(None) for a in args)


TEXT_KEYS = frozenset(name for name, f in TrainConfig.model_fields.items() if _is_text(f.annotation))


def parse_overrides(pairs: list[str]) -> dict[str, Any]:
    """`key=value` strings; values parsed as YAML scalars/lists/maps (so 1e-4, true, [a, b] work),
    except for keys whose type is text: their value stays the text given (`fused_norms=off`)."""
    out: dict[str, Any] = {}
    for pair in pairs:
        if "=" not in pair:
            raise ConfigError(f"--set expects key=value, got '{pair}'", field="set")
        key, value = pair.split("=", 1)
        key = key.strip()
        if value == "":
            out[key] = None
        elif key in TEXT_KEYS:
            out[key] = value
        else:
            try:
                out[key] = load_yaml(value)
            except yaml.YAMLError as exc:
                raise ConfigError(
                    f"--set {key}: not a valid value ({getattr(exc, 'problem', None) or exc}); "
                    f"quote text that holds YAML characters",
                    field=key,
                ) from None
    return out


def _explain(err: ValidationError, source: str) -> ConfigError:
    first = err.errors()[0]
    loc = ".".join(str(p) for p in first["loc"]) or "config"
    if first["type"] == "extra_forbidden":
        close = difflib.get_close_matches(loc, TrainConfig.model_fields, n=1)
        hint = f"; did you mean '{close[0]}'?" if close else f"; allowed keys: {', '.join(TrainConfig.model_fields)}"
        return ConfigError(f"unknown key '{loc}'{hint}", file=source)
    msg = first["msg"]
    if first["type"] == "literal_error":
        msg = f"value {first.get('input')!r} not allowed; {msg.lower()}"
    return ConfigError(msg, file=source, field=loc)


def load_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> TrainConfig:
    """Read YAML (if given), apply overrides, validate. Errors are one line naming the key."""
    raw: dict[str, Any] = {}
    source = "command line"
    if path is not None:
        source = str(path)
        try:
            raw = load_yaml(Path(path).read_text(encoding="utf-8-sig")) or {}
        except FileNotFoundError:
            raise ConfigError("no such configuration file", file=source) from None
        except IsADirectoryError:
            raise ConfigError("a folder, not a configuration file", file=source) from None
        except UnicodeDecodeError as exc:
            raise ConfigError(f"not UTF-8 text (byte 0x{exc.object[exc.start]:02x})", file=source) from None
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            raise ConfigError(
                f"not valid YAML: {getattr(exc, 'problem', exc)}", file=source, line=(mark.line + 1) if mark else None
            ) from None
        if not isinstance(raw, dict):
            raise ConfigError("the configuration must be a mapping of keys to values", file=source)
        for key in raw:
            if not isinstance(key, str):  # `1: 2` or `null: 3` reached TrainConfig(**...) as a TypeError traceback
                raise ConfigError(f"the key {key!r} is not a name", file=source)
    merged = {**raw, **(overrides or {})}
    reading = _FROM_FILE.set(True)
    try:
        return TrainConfig.model_validate(merged)
    except ValidationError as err:
        loc = err.errors()[0]["loc"]
        given_here = bool(loc) and loc[0] in (overrides or {})  # a flag or --set: not the file's to answer for
        raise _explain(err, "command line" if given_here else source) from None
    finally:
        _FROM_FILE.reset(reading)


def save_config(cfg: TrainConfig, path: Path) -> None:
    path.write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False), encoding="utf-8")
