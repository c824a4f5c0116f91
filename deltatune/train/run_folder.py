"""The run folder's rules: what may be written where, and when a resume is the same run.

Checked before any weights load, so that a mistake costs nothing and leaves nothing behind:
- a folder that holds a run is refused without --resume (continue it) or --overwrite (replace it);
  --overwrite removes only the run's own entries and never the model or data being read;
- --resume needs an intact checkpoint, and continues only the run that was trained: every key
  that changes what is trained (data content, model, method and options, policy, template,
  lengths, batch shape, optimiser, seed, ...) must be as it was; keys that may change (steps,
  cadences, threads, device) are applied, reported, and recorded in config.yaml's history.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any, Callable, Iterator

import yaml

from deltatune.config import TrainConfig, load_yaml
from deltatune.errors import ConfigError
from deltatune.fileio import check_writable, overlaps, remove_interrupted_writes, strict_json, write_text_atomic
from deltatune.train.checkpoint import list_checkpoints, read_meta, verify_checkpoint
from deltatune.train.snapshot import SNAPSHOT_DIR

SUMMARY_FILE = "summary.json"  # written when a run finishes: its final losses, for scripts (no log parsing)
# everything `deltatune train` writes into its output folder
RUN_CONFIG_HEADER = "# deltatune run:"  # config.yaml's first line: --overwrite replaces only folders with it
RUN_ENTRIES = (
    "config.yaml",
    "final",
    "best",
    "checkpoints",
    "snapshots",  # snapshot_every: an old run's later snapshots must not be read as this run's
    "metrics.jsonl",
    "parameters.json",
    SUMMARY_FILE,
    "tensorboard",
)
# keys a resumed run may change: they decide how long and how visibly it runs, not what it learns
MAY_CHANGE = frozenset(
    {
        "steps",
        "epochs",
        "save_every",
        "snapshot_every",
        "eval_every",
        "log_every",
        "num_threads",
        "device",
        "gradient_checkpointing",
        "fused_norms",
    }
)
_NOT_RECORDED = frozenset({"output", "resume", "overwrite"})


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def data_fingerprint(cfg: TrainConfig, records: list[dict] | None, eval_records: list[dict] | None) -> dict:
    """SHA-256 of the training (and held-out) data: what resume compares instead of file names."""

    def of(path: str | None, recs: list[dict] | None) -> str | None:
        if recs is not None:
            return hashlib.sha256(json.dumps(recs, sort_keys=True, default=str).encode()).hexdigest()
        if path and Path(path).is_file():
            return sha256_file(path)
        return None

    return {"data": of(cfg.data, records), "eval_data": of(cfg.eval_data, eval_records)}


# what decides the model a run trains: the weights transformers loads (a re-export of other weights differs in
# every changed tensor) and config.json read as settings (its transformers_version changes with every re-save)
_WEIGHT_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
_WEIGHT_FILES = ("model.safetensors", "upcycled.safetensors", "pytorch_model.bin")  # upcycled: deltatune's format
_SAMPLE = 1 << 12  # bytes read at each end of a tensor, or of a block of a file without a tensor table
_BLOCKS = 256


def _loaded_weights(folder: Path) -> list[Path]:
    """The weights files transformers reads from a model folder, in its order of preference (an index's shards,
    else the single file; safetensors before pickles): other files beside them never load."""
    for index in _WEIGHT_INDEXES:
        if (folder / index).is_file():
            shards = json.loads((folder / index).read_text(encoding="utf-8")).get("weight_map", {}).values()
            return [folder / name for name in sorted(set(shards))]
    return [folder / name for name in _WEIGHT_FILES if (folder / name).is_file()][:1]


def _sampled_sha256(path: Path) -> str:
    """SHA-256 of a weights file's size and samples of its content, read in milliseconds where hashing a 70B
    model took minutes at every resume: for safetensors, both ends of every tensor (a merge into the q_proj
    weights alone changes those tensors, mid-file); for other files, both ends of 256 evenly spaced blocks."""
    digest = hashlib.sha256()
    size = path.stat().st_size
    digest.update(str(size).encode())
    with open(path, "rb") as fh:
        spans = _safetensors_spans(fh, size) if path.suffix == ".safetensors" else None
        if spans is None:
            step = max(size // _BLOCKS, 1)
            spans = [(start, min(start + step, size)) for start in range(0, size, step)]
        for start, end in spans:
            for at in sorted({start, max(start, end - _SAMPLE)}):
                fh.seek(at)
                digest.update(fh.read(min(_SAMPLE, end - at)))
    return digest.hexdigest()


def _safetensors_spans(fh, size: int) -> list[tuple[int, int]] | None:
    """(start, end) file offsets of the header and of every tensor's data, or None for a damaged header."""
    head = fh.read(8)
    if len(head) < 8:
        return None
    length = int.from_bytes(head, "little")
    if length > size - 8:
        return None
    try:
        header = json.loads(fh.read(length))
    except ValueError:
        return None
    base = 8 + length
    spans = [(0, base)]
    for name, entry in sorted(header.items()):
        if name != "__metadata__" and isinstance(entry, dict) and len(entry.get("data_offsets", ())) == 2:
            start, end = entry["data_offsets"]
            spans.append((base + int(start), base + int(end)))
    return spans


def tokens_fingerprint(examples: list) -> str:
    """SHA-256 of every example's token ids and the roles that decide their loss weights."""
    from array import array

    from deltatune.data.segments import Role

    code = {role: i for i, role in enumerate(Role)}
    digest = hashlib.sha256()
    for ex in examples:
        digest.update(array("q", ex.input_ids).tobytes())
        digest.update(bytes(code[r] for r in ex.roles))
        digest.update(b"\x00")
    return digest.hexdigest()


def model_fingerprint(path: Path | None) -> dict[str, str] | None:
    """{file: sha256} of what a local model (folder or GGUF file) trains from, for resume to refuse other weights at
    the same path (a folder re-exported from a later run). None for a hub id, a model not on disk yet, or files
    that cannot be read (the load says why)."""
    if path is None or not path.exists():
        return None
    try:
        if path.is_file():
            return {path.name: _sampled_sha256(path)}
        prints = {file.name: _sampled_sha256(file) for file in _loaded_weights(path)}
        for name in ("config.json", "upcycle.json"):  # an upcycled folder's routing is in the second
            if (path / name).is_file():
                settings = json.loads((path / name).read_text(encoding="utf-8"))
                if isinstance(settings, dict):
                    settings.pop("transformers_version", None)
                prints[name] = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()
    except (OSError, ValueError):
        return None
    return prints or None


def holds_run(out: Path) -> list[str]:
    """The run entries that exist in `out`."""
    return [name for name in RUN_ENTRIES if (out / name).exists()] if out.is_dir() else []


def is_deltatune_run(out: Path) -> bool:
    """`out` holds a run's config.yaml (written as training starts, before anything else of the run): its header,
    or, from runs written before the header, a mapping of training keys only."""
    import yaml

    try:
        text = (out / "config.yaml").read_text(encoding="utf-8")
        if text.startswith(RUN_CONFIG_HEADER):
            return True
        settings = yaml.safe_load(text)
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return False
    return isinstance(settings, dict) and {"model", "method"} <= settings.keys() <= TrainConfig.model_fields.keys()


def check_reads_outside_run_entries(output: str, reads: dict[str, str | None]) -> None:
    """Refuse a file being read that is one of the run's own entries in `output` (its config.yaml, something
    inside final/ or checkpoints/ ...): the run writes them, and --overwrite removed a hand-written config.yaml
    that was being read (it passed for an earlier run's record)."""
    out = Path(output).expanduser().resolve()
    entries = {(out / name): name for name in RUN_ENTRIES}
    for what, path in reads.items():
        if not path or not Path(path).expanduser().exists():
            continue
        read = Path(path).expanduser().resolve()
        hit = next((name for entry, name in entries.items() if read == entry or entry in read.parents), None)
        if hit is not None:
            raise ConfigError(
                f"the {what} being read ({path}) is the run's own {hit} in {output}, which training writes; "
                "move it or choose another --output",
                field="output",
            )


def check_output_folder(cfg: TrainConfig, reads: dict[str, str | None]) -> None:
    """Refuse, before anything loads, an output that would destroy a run or what is read."""
    out = Path(cfg.output).expanduser()
    check_reads_outside_run_entries(cfg.output, reads)
    for what, path in reads.items():
        if path and Path(path).expanduser().exists():
            read = Path(path).expanduser().resolve()
            if out.resolve() == read or read in out.resolve().parents:
                raise ConfigError(
                    f"{cfg.output} is or lies inside the {what} being read ({path}); choose another --output",
                    field="output",
                )
    if out.exists() and not out.is_dir():
        raise ConfigError(f"{cfg.output} exists and is not a folder", field="output")
    if cfg.resume and cfg.overwrite:
        raise ConfigError("--resume continues a run and --overwrite replaces it; give one of them", field="resume")
    found = holds_run(out)
    if cfg.resume:
        if not list_checkpoints(out):
            what = "no run" if not found else "a run without checkpoints (save them with --save-every)"
            raise ConfigError(f"{cfg.output} holds {what}, nothing to resume from", field="resume")
    elif found and not cfg.overwrite:
        raise ConfigError(
            f"{cfg.output} already holds a run ({', '.join(found)}); pass --resume to continue it, "
            f"--overwrite to replace it, or choose another --output",
            field="output",
        )
    elif found:
        if not is_deltatune_run(out):
            raise ConfigError(
                f"{cfg.output} holds {', '.join(found)} but is not a deltatune run (no config.yaml of one); "
                f"--overwrite replaces only runs: choose another --output",
                field="output",
            )
        for name in found:
            for what, path in reads.items():
                if path and Path(path).expanduser().exists() and overlaps(out / name, path):
                    raise ConfigError(
                        f"--overwrite would remove {out / name}, which holds the {what} being read "
                        f"({path}); choose another --output",
                        field="output",
                    )
    check_writable(out, field="output")


def start_output(cfg: TrainConfig) -> Path:
    """Create the output folder as training starts; with --overwrite, first remove the old run's entries. What a
    killed run's writes left half-done (a temporary checkpoint folder, as large as the model and its optimizer
    state) is removed on resume and overwrite."""
    out = Path(cfg.output).expanduser()
    if cfg.overwrite:  # config.yaml last: a folder left half-removed by an interrupt still reads as a run
        for name in sorted(holds_run(out), key=lambda name: name == "config.yaml"):
            target = out / name
            shutil.rmtree(target) if target.is_dir() and not target.is_symlink() else target.unlink()
    if cfg.overwrite or cfg.resume:
        for folder in (out / "checkpoints", out / SNAPSHOT_DIR):
            remove_interrupted_writes(folder, lambda name: name.startswith("step-"))
        remove_interrupted_writes(out, lambda name: name in RUN_ENTRIES)
    out.mkdir(parents=True, exist_ok=True)
    return out


def pick_checkpoint(cfg: TrainConfig, warn: Callable[[str], None]) -> tuple[Path, dict]:
    """The newest checkpoint whose files are intact (older ones are tried with a warning), and its meta."""
    out = Path(cfg.output).expanduser()
    for path in reversed(list_checkpoints(out)):
        why = verify_checkpoint(path)
        if why is None:
            return path, read_meta(path)
        warn(f"warning: checkpoint {path} is damaged: {why}; trying an older one")
    raise ConfigError(f"{cfg.output}: no intact checkpoint to resume from (every one is damaged)", field="resume")


def _saved_config(out: Path, meta: dict) -> dict | None:
    if isinstance(meta.get("config"), dict):
        return meta["config"]
    try:  # checkpoints written before configs were recorded in them
        saved = load_yaml((out / "config.yaml").read_text(encoding="utf-8"))
        return saved if isinstance(saved, dict) else None
    except (OSError, ValueError, yaml.YAMLError):  # a hand-edited config.yaml that no longer parses
        return None


def compiled_layers_at(out: Path, meta: dict) -> bool:
    """Whether the run that wrote a checkpoint had its layers compiled: `compile_layers: auto` resumes that
    way whatever it would decide now (compiled and eager steps differ in rounding, so switching mid-run would
    break the bitwise-equal resume). Checkpoints from before auto ran as their config said (false unless set)."""
    if isinstance(meta.get("compiled_layers"), bool):
        return meta["compiled_layers"]
    saved = _saved_config(out, meta) or {}
    return saved.get("compile_layers") is True


def _same_model(a: Any, b: Any) -> bool:
    if a == b:
        return True
    if a and b and Path(str(a)).expanduser().exists() and Path(str(b)).expanduser().exists():
        return Path(str(a)).expanduser().resolve() == Path(str(b)).expanduser().resolve()
    return False


def _short(value: Any) -> str:
    text = json.dumps(value) if not isinstance(value, str) else value
    return text if len(text) <= 40 else text[:37] + "..."


def compare_for_resume(cfg: TrainConfig, meta: dict, fingerprint: dict) -> dict[str, list]:
    """Refuse a resume that would train something else (one line naming each difference); return the
    keys that may change and did, as {key: [old, new]}."""
    out = Path(cfg.output).expanduser()
    saved = _saved_config(out, meta)
    if saved is None:
        return {}
    new = cfg.model_dump(mode="json")
    # the batch shape is the global micro-batch: rows per process x processes (torchrun sets WORLD_SIZE)
    saved = {**saved, "batch_size": saved.get("batch_size", 4) * int(meta.get("world_size") or 1)}
    new["batch_size"] = cfg.batch_size * int(os.environ.get("WORLD_SIZE", "1") if "RANK" in os.environ else 1)
    fields = TrainConfig.model_fields
    refused, changed = [], {}
    for key, value in new.items():
        if key in _NOT_RECORDED or key in ("data", "eval_data"):
            continue
        # a key the checkpoint's run did not record had its default then (a factory's value for dicts and lists)
        old = saved.get(key, fields[key].get_default(call_default_factory=True) if key in fields else None)
        if old == value or (key == "model" and _same_model(old, value)):
            continue
        if key == "compile_layers" and value == "auto":  # auto resumes as the checkpoint ran (compiled_layers_at)
            continue
        if key in MAY_CHANGE:
            changed[key] = [old, value]
        else:
            name = "batch_size (global: per process x processes)" if key == "batch_size" else key
            refused.append(f"{name} {_short(old)} -> {_short(value)}")
    old_prints = meta.get("data_sha256") or {}
    for key in ("data", "eval_data"):
        old_hash, new_hash = old_prints.get(key), fingerprint.get(key)
        if key not in old_prints:  # older checkpoints: compare the paths
            if saved.get(key) != new[key]:
                refused.append(f"{key} {_short(saved.get(key))} -> {_short(new[key])}")
        elif old_hash != new_hash:
            refused.append(f"{key} content (sha256 {str(old_hash)[:12]}) -> (sha256 {str(new_hash)[:12]})")
    old_model, new_model = old_prints.get("model"), fingerprint.get("model")
    if old_model and new_model and old_model != new_model:  # unknown on either side (older checkpoints): not compared

        def how(f: str) -> str:
            return f"{f} {'added' if f not in old_model else 'removed' if f not in new_model else 'changed'}"

        files = sorted(f for f in old_model.keys() | new_model.keys() if old_model.get(f) != new_model.get(f))
        refused.append(f"model content: {', '.join(map(how, files[:3]))}{' ...' if len(files) > 3 else ''}")
    if refused:
        raise ConfigError(
            f"{cfg.output} was trained with other settings; put them back or start a new --output: "
            + "; ".join(refused),
            field="resume",
        )
    return changed


def record_config(cfg: TrainConfig) -> dict:
    """The configuration as checkpoints record it (what was trained; not how the command was called)."""
    return {k: v for k, v in cfg.model_dump(mode="json").items() if k not in _NOT_RECORDED}


def save_run_config(cfg: TrainConfig, out: Path, history: list[dict]) -> None:
    """config.yaml: the configuration that was trained, with the changes made on resume as comments."""
    import yaml

    lines = [f"{RUN_CONFIG_HEADER} the configuration this run was trained with."]
    if history:
        lines.append("# changed when the run was resumed (applied from that step on):")
        for entry in history:
            what = ", ".join(f"{k} {_short(a)} -> {_short(b)}" for k, (a, b) in entry["changes"].items())
            lines.append(f"#   step {entry['step']}: {what}")
    body = yaml.safe_dump({**cfg.model_dump(mode="json"), "resume": False, "overwrite": False}, sort_keys=False)
    write_text_atomic(out / "config.yaml", "\n".join(lines) + "\n" + body)


def _metric_lines(path: Path) -> Iterator[tuple[str, dict]]:
    """metrics.jsonl's lines that are step records, with their parsed record (a line cut short by a kill is
    skipped)."""
    if not path.exists():
        return
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and isinstance(record.get("step"), int):
            yield line, record


def best_eval_after(path: Path, step: int) -> tuple[int, float] | None:
    """(step, eval loss) of what best/ holds, read from metrics.jsonl, when an evaluation after `step` wrote it:
    best/ is written at each eval loss lower than every earlier one, so it holds the first lowest."""
    best: tuple[int, float] | None = None
    for _, record in _metric_lines(path):
        loss = record.get("eval_loss")
        if isinstance(loss, (int, float)) and (best is None or loss < best[1]):
            best = (record["step"], float(loss))
    return best if best is not None and best[0] > step else None


def truncate_metrics(path: Path, step: int) -> None:
    """Keep metrics.jsonl's records up to `step` (those after the checkpoint will be logged again)."""
    if not path.exists():
        return
    kept = [line for line, record in _metric_lines(path) if record["step"] <= step]
    write_text_atomic(path, "".join(f"{line}\n" for line in kept))


def write_summary(out: Path, result: Any, eval_examples: int, best_eval: float | None) -> None:
    """summary.json: how the finished run ended (final train and held-out loss, throughput), written last, so
    a folder holding one holds the final/ it describes."""
    record = {
        "steps": result.steps,
        "train_loss": result.final_loss,
        "eval_loss": result.eval_loss,
        "eval_examples": eval_examples,
        "best_eval_loss": best_eval,
        "real_tokens": result.real_tokens,
        "seconds": round(result.seconds, 3),
        "tokens_per_s": round(result.tokens_per_s, 2),
    }
    write_text_atomic(out / SUMMARY_FILE, json.dumps(strict_json(record), indent=2) + "\n")  # a NaN loss: null
