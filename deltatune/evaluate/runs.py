"""Read a training run folder: its config, its final adapter or model, and its checkpoints.

A run folder (written by `deltatune train`) holds `config.yaml`, a `final/` folder (an adapter:
`adapter_config.json` or `deltatune_adapter.json`; or a full model: `config.json`) and
checkpoint folders with `trainable.safetensors` + `meta.json`. An adapter or model folder given
directly counts as a run with only a final snapshot.
"""

from __future__ import annotations

import copy
import json
import re
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch
import yaml

from deltatune.errors import ConfigError, UserError
from deltatune.fileio import unreadable_safetensors

ADAPTER_FILES = ("adapter_config.json", "deltatune_adapter.json")
CHECKPOINT_WEIGHTS = "trainable.safetensors"


@dataclass
class Snapshot:
    path: Path
    kind: str  # "adapter" | "model" | "checkpoint"
    step: int | None  # optimizer step (None for a final folder without one)
    label: str


@dataclass
class RunInfo:
    path: Path
    config: dict[str, Any]
    method: str
    rank: int | None
    label: str
    final: Snapshot | None
    checkpoints: list[Snapshot] = field(default_factory=list)

    @property
    def recorded_base(self) -> tuple[bool, str | None]:
        """(whether the run says, the base it was trained from; None is the default model): its config.yaml's
        `model`, else its adapter's `base_model_name_or_path`. A model folder without a config says nothing."""
        from deltatune.methods.peft_format import adapter_base_model

        if self.config:
            return True, self.config.get("model")
        if self.final is not None and self.final.kind == "adapter":
            named = adapter_base_model(self.final.path)
            return named is not None, named
        return False, None

    @property
    def base_model(self) -> str | None:
        """The base to load for this run (None: the default model). An adapter folder given alone has no
        config.yaml: its own record of the base counts (analyze loaded the default model for it)."""
        return self.recorded_base[1]


def _folder_kind(path: Path) -> str | None:
    if any((path / f).exists() for f in ADAPTER_FILES):
        return "adapter"
    if (path / "config.json").exists():
        return "model"
    if (path / CHECKPOINT_WEIGHTS).exists():
        return "checkpoint"
    return None


def _step(path: Path) -> int | None:
    meta = path / "meta.json"
    if meta.exists():
        try:
            return int(json.loads(meta.read_text())["position"]["step"])
        except (KeyError, ValueError, TypeError, json.JSONDecodeError):
            pass
    digits = re.findall(r"\d+", path.name)
    return int(digits[-1]) if digits else None


@contextmanager
def _blamed_on_run(field: str = "adapter") -> Iterator[None]:
    """An adapter error names field 'adapter' (load_adapter's argument), a model folder's 'model' (load_model's);
    here the user gave the folder as --run."""
    try:
        yield
    except UserError as exc:
        if exc.field != field:
            raise
        raise exc.blamed_on("run") from None


def _adapter_specs(folder: Path) -> list:
    from deltatune.methods.peft_format import read_adapter

    with _blamed_on_run():
        return read_adapter(folder)[0]


def read_run(path: str | Path) -> RunInfo:
    """The run's config, label ("lora r=8"), final snapshot and checkpoints (sorted by step)."""
    root = Path(path)
    if not root.is_dir():
        why = "is a file, not a run folder" if root.exists() else "no such run folder"
        raise UserError(f"{root}: {why}", field="run")
    config: dict[str, Any] = {}
    if (root / "config.yaml").exists():
        try:
            config = yaml.safe_load((root / "config.yaml").read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            raise ConfigError(
                f"not valid YAML: {getattr(exc, 'problem', None) or str(exc).splitlines()[0]}",
                file=str(root / "config.yaml"),
                line=(mark.line + 1) if mark else None,
            ) from None
    final = None
    for candidate in (root / "final", root):
        kind = _folder_kind(candidate) if candidate.is_dir() else None
        if kind in ("adapter", "model"):
            final = Snapshot(candidate, kind, _step(candidate) if candidate.name != "final" else None, "final")
            break
    checkpoints = []
    for sub in sorted(p for p in root.rglob(CHECKPOINT_WEIGHTS) if not any(x.startswith(".") for x in p.parts)):
        folder = sub.parent
        step = _step(folder)
        checkpoints.append(Snapshot(folder, "checkpoint", step, f"step {step}" if step is not None else folder.name))
    checkpoints.sort(key=lambda s: (s.step is None, s.step or 0, s.path.parent.name != "snapshots"))
    checkpoints = _one_per_step(checkpoints)
    from deltatune.methods.base import get_method
    from deltatune.methods.full import FullFinetune
    from deltatune.methods.specs import split_methods

    method = str(config.get("method") or "")
    rank = config.get("rank")
    if not method and final is not None:
        if final.kind == "adapter":
            specs = _adapter_specs(final.path)
            method, rank = "+".join(s.name for s in specs), specs[0].rank
        else:
            method, rank = FullFinetune.name, None  # a whole model and no config: label it as full finetuning
    if not method:
        raise UserError(f"{root}: not a run folder (no config.yaml, final/ adapter or model)", field="run")
    show_rank = rank is not None and any(get_method(n).has_rank for n in split_methods(method))
    label = f"{method} r={rank}" if show_rank else method
    return RunInfo(root, config, method, int(rank) if show_rank else None, label, final, checkpoints)


def _one_per_step(snaps: list[Snapshot]) -> list[Snapshot]:
    """A snapshot and a checkpoint at the same step hold the same weights: keep the first (the snapshot)."""
    seen, out = set(), []
    for s in snaps:
        if s.step is not None and s.step in seen:
            continue
        seen.add(s.step)
        out.append(s)
    return out


def last_trained_step(root: Path) -> int | None:
    """The step final/ was saved at: summary.json's, else the highest in metrics.jsonl, if the run has either."""
    try:
        steps = json.loads((Path(root) / "summary.json").read_text(encoding="utf-8")).get("steps")
        if isinstance(steps, int):
            return steps
    except (OSError, ValueError, AttributeError):
        pass
    path = Path(root) / "metrics.jsonl"
    if not path.is_file():
        return None
    last = None
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            step = json.loads(line).get("step")
        except (json.JSONDecodeError, AttributeError):
            continue
        if isinstance(step, int):
            last = step if last is None else max(last, step)
    return last


def unique_labels(runs: list[RunInfo]) -> list[str]:
    """Method-and-rank labels, with as much of the path added as tells two runs apart where they would share one
    (seed0/final and seed1/final both read "(final)", and the report kept one of them). The same run twice is
    refused: its rows would be one run counted twice."""
    seen: dict[Path, Path] = {}
    for r in runs:
        real = r.path.resolve()
        if real in seen:
            raise UserError(f"{r.path}: the same run as {seen[real]}, given twice", field="run")
        seen[real] = r.path
    labels = [r.label for r in runs]
    named = []
    for lab, r in zip(labels, runs):
        twins = [t for t, other in zip(labels, runs) if other is not r and t == lab]
        if not twins:
            named.append(lab)
            continue
        parts = r.path.absolute().parts  # as given (a link keeps its own name), made absolute for "../x"
        others = [o.path.absolute().parts for t, o in zip(labels, runs) if o is not r and t == lab]
        depth = next(d for d in range(1, len(parts) + 1) if all(o[-d:] != parts[-d:] for o in others))
        named.append(f"{lab} ({'/'.join(parts[-depth:])})")
    return named


def specs_from_config(config: dict[str, Any]) -> list:
    """MethodSpecs as the trainer builds them from config.yaml (method may be 'lora+bitfit')."""
    from deltatune.methods.specs import specs_from_config as build

    return build(config)


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")


def snapshot_tokenizer(snap: Snapshot, base_tokenizer):
    """The tokenizer to score `snap` with: a full model's own where its folder has one (a model finetuned
    elsewhere may have added tokens or changed ids), the base's for adapters and checkpoints; either way with the
    base's chat template, so that the base and every run are scored on the same prompts (a model's folder carries
    its training template, which would score it in another style than the base and the adapters)."""
    if snap.kind != "model" or not any((snap.path / f).exists() for f in TOKENIZER_FILES):
        return base_tokenizer
    from deltatune.models import load_tokenizer

    tokenizer = load_tokenizer(snap.path)
    tokenizer.chat_template = base_tokenizer.chat_template
    return tokenizer


def load_snapshot(
    base: torch.nn.Module,
    run: RunInfo,
    snap: Snapshot,
    dtype: torch.dtype = torch.float32,
    trainable_dtype: torch.dtype | None = None,
):
    """A fresh model for this snapshot: a copy of `base` with the adapter or checkpoint weights in.

    `trainable_dtype` (adapters): hold the adapter's tensors in it, as training did (fp32 over a bf16 base)."""
    if snap.kind == "model":
        from deltatune.models import load_model

        with _blamed_on_run("model"):
            return load_model(str(snap.path), dtype=dtype)[0]
    model = copy.deepcopy(base)
    if snap.kind == "adapter":
        from deltatune.methods.apply import load_adapter

        with _blamed_on_run():
            return load_adapter(model, snap.path, trainable_dtype=trainable_dtype).model
    from safetensors.torch import load_file

    from deltatune.methods.apply import apply_methods

    if run.final is not None and run.final.kind == "adapter":
        specs = _adapter_specs(run.final.path)
    else:
        specs = specs_from_config(run.config)
    if not specs:
        raise UserError(f"{run.path}: cannot tell which method made {snap.path.name} (no config.yaml)", field="run")
    adapted = apply_methods(model, specs)
    model = adapted.model
    path = snap.path / CHECKPOINT_WEIGHTS
    try:
        state = load_file(str(path))
    except Exception as exc:  # safetensors' own error type (a file cut short), or OSError
        raise unreadable_safetensors(path, exc, "run") from None
    own = dict(model.named_parameters())
    unexpected = [k for k in state if k not in own]
    if unexpected:
        raise ConfigError(f"checkpoint tensor '{unexpected[0]}' does not fit the model", file=str(path))
    # a tensor left out would stay at its initial value and be measured as an update of zero
    missing = [n for n, _ in adapted.trainable_parameters() if n not in state]
    if missing:
        raise ConfigError(f"checkpoint lacks {len(missing)} trained tensor(s), e.g. '{missing[0]}'", file=str(path))
    wrong = next((k for k, v in state.items() if v.shape != own[k].shape), None)
    if wrong is not None:
        raise ConfigError(
            f"checkpoint tensor '{wrong}' has shape {tuple(state[wrong].shape)}, the model expects "
            f"{tuple(own[wrong].shape)} (does config.yaml describe this run?)",
            file=str(path),
        )
    with torch.no_grad():
        for k, v in state.items():
            own[k].copy_(v.to(own[k].dtype))
    return model
