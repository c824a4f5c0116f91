"""The Self-Instruct bootstrap, resumable: rounds of generate -> filter -> classify -> instances -> keep.

The model is a parameter, `generate(prompts, stop=..., seed=...) -> texts`, so the pipeline runs with
any generator (a model through `deltatune.evaluate.generate`, or a scripted one in tests). Every round
draws its samples from a random generator seeded by (seed, round) and passes a seed derived the same
way to the model, so a round's result depends only on the tasks kept before it.

Progress lives in a folder: `progress.jsonl` gets one line per finished round (append-only: the kept
tasks and every dropped instruction with its reason), and `checkpoint.json`, replaced atomically after
each append, records how many rounds and how many bytes of the log are complete. Resuming cuts the log
back to that length (a line torn by a kill is discarded), replays it, and goes on from the next round,
so a killed run and an uninterrupted one write the same file.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Protocol

from tqdm.auto import tqdm

from deltatune.data.instructions.output import write_json_atomic, write_jsonl_atomic
from deltatune.data.instructions.self_instruct_text import (
    CLASSIFY_STOP,
    INSTANCE_STOP,
    INSTRUCTION_STOP,
    Task,
    classify_prompt,
    clean_instances,
    instance_prompt,
    instruction_drop_reason,
    instruction_prompt,
    parse_instances,
    parse_instructions,
    parse_is_classification,
)
from deltatune.data.instructions.similarity import rouge_l, rouge_tokens
from deltatune.errors import ConfigError, UserError
from deltatune.evaluate.generate import Generation, cut_at_stop

PROGRESS, CHECKPOINT, SETTINGS, REPORT, TASKS = (
    "progress.jsonl",
    "checkpoint.json",
    "settings.json",
    "report.json",
    "tasks.jsonl",
)
WORK_FILES = (PROGRESS, CHECKPOINT, SETTINGS, REPORT, TASKS)  # what the run writes in its --work folder
_KEEP_EXAMPLES = 5  # dropped instructions kept per reason in the report


CLASSIFY_MAX_TOKENS = 4  # "Yes" or "No" (the paper asks for 3 tokens)


class GenerateFn(Protocol):
    """Continuations of raw prompts; `max_new_tokens` (None: the generator's own limit) caps short answers.
    A continuation is text, or a `Generation` that also says whether it ran to the token limit (cut short:
    the paper drops such instances, and the last instruction of such a list)."""

    def __call__(
        self, prompts: list[str], *, stop: tuple[str, ...], seed: int, max_new_tokens: int | None = None
    ) -> list[str | Generation]: ...


@dataclass
class SelfInstructConfig:
    n: int  # new tasks to keep
    seed: int = 0
    prompts_per_round: int = 4
    in_context: int = 8  # tasks shown per instruction prompt
    in_context_generated: int = 2  # of which generated ones, once there are enough
    classify_shots: int = 12
    instance_shots: int = 2
    rouge_threshold: float = 0.7
    max_rounds: int | None = None  # None: 20 * n

    def check(self) -> None:
        if self.n < 1:
            raise ConfigError(f"must be at least 1, got {self.n}", field="--n")
        if self.prompts_per_round < 1:
            raise ConfigError(f"must be at least 1, got {self.prompts_per_round}", field="--prompts-per-round")
        if not 0.0 < self.rouge_threshold <= 1.0:
            raise ConfigError(f"must be in (0, 1], got {self.rouge_threshold}", field="--rouge")
        if self.max_rounds is not None and self.max_rounds < 1:
            raise ConfigError(f"must be at least 1, got {self.max_rounds}", field="--max-rounds")


@dataclass
class SelfInstructResult:
    tasks: list[Task]
    rounds: int
    dropped: Counter = field(default_factory=Counter)
    examples: dict[str, list[str]] = field(default_factory=dict)  # reason -> a few dropped instructions
    complete: bool = True  # False: stopped at max_rounds with fewer than n tasks

    def records(self) -> list[dict]:
        """Alpaca records, one per instance: what `deltatune train` reads."""
        return [
            {"instruction": t.instruction, "input": inst["input"], "output": inst["output"]}
            for t in self.tasks
            for inst in t.instances
        ]

    def report(self) -> dict:
        return {
            "kept": len(self.tasks),
            "rounds": self.rounds,
            "complete": self.complete,
            "classification": sum(t.is_classification for t in self.tasks),
            "dropped": dict(sorted(self.dropped.items())),
            "examples": self.examples,
        }

    def format(self) -> str:
        lines = [
            f"kept {len(self.tasks)} tasks ({sum(t.is_classification for t in self.tasks)} classification), "
            f"{len(self.records())} instances, after {self.rounds} rounds"
        ]
        if not self.complete:
            lines.append("stopped at --max-rounds before reaching --n")
        lines.append(f"dropped {sum(self.dropped.values())} instructions:")
        lines += [
            f"  {reason}: {n}" + (f"  e.g. {self.examples[reason][0]!r}" if self.examples.get(reason) else "")
            for reason, n in sorted(self.dropped.items())
        ]
        return "\n".join(lines) + "\n"


def _derived_seed(seed: int, round_: int, stage: str) -> int:
    digest = hashlib.sha256(f"{seed}/{round_}/{stage}".encode()).digest()
    return int.from_bytes(digest[:4], "little")


def _settings(config: SelfInstructConfig, seeds: list[Task], model: str | None, generation: dict | None) -> dict:
    seeds_hash = hashlib.sha256(json.dumps([t.to_json() for t in seeds], sort_keys=True).encode()).hexdigest()
    return {"config": asdict(config), "seeds_sha256": seeds_hash, "model": model, "generation": generation}


class _Progress:
    """The work folder: settings, the append-only round log and the atomic checkpoint."""

    def __init__(self, work: Path) -> None:
        self.work = work
        self.log = work / PROGRESS
        self.checkpoint = work / CHECKPOINT

    def start(self, settings: dict, resume: bool) -> list[dict]:
        """Returns the rounds already done (empty for a fresh run)."""
        if self.work.exists() and not self.work.is_dir():
            raise UserError("is a file; --work must be a folder for the run's progress", file=str(self.work))
        if resume and not (self.work.exists() and any(self.work.iterdir())):  # a typo started a fresh run
            raise UserError("holds no run, nothing to resume (is --work the folder of the run?)", file=str(self.work))
        if self.work.exists() and any(self.work.iterdir()):
            if not resume:
                raise UserError(
                    "holds a previous run: pass --resume to continue it, or choose another --work", file=str(self.work)
                )
            if not (self.work / SETTINGS).exists():
                raise UserError(f"is not a self-instruct progress folder (no {SETTINGS})", file=str(self.work))
            saved = json.loads((self.work / SETTINGS).read_text(encoding="utf-8"))
            saved.setdefault("generation", settings["generation"])  # a folder from before it was recorded
            if saved != settings:
                changed = sorted(k for k in set(saved) | set(settings) if saved.get(k) != settings.get(k))
                raise UserError(
                    f"was started with other settings ({', '.join(changed)}); resume with the same ones",
                    file=str(self.work),
                )
            done = json.loads(self.checkpoint.read_text(encoding="utf-8")) if self.checkpoint.exists() else None
            size = done["bytes"] if done else 0
            if not self.log.exists() or self.log.stat().st_size < size:  # truncate() would pad it with NUL bytes
                raise UserError(
                    f"{PROGRESS} is shorter than {CHECKPOINT} records ({size} bytes): the folder was changed, "
                    "start a new --work",
                    file=str(self.work),
                )
            with self.log.open("ab") as fh:  # discard anything after the last checkpoint (a torn line)
                fh.truncate(size)
            # split on newlines only: splitlines() also cut a line at U+2028, U+2029 and NEL, which json.dumps
            # leaves unescaped under ensure_ascii=False (a generated output holding one made the run unresumable)
            lines = self.log.read_bytes().decode("utf-8", errors="replace").split("\n")
            rounds = []
            for number, line in enumerate(lines[:-1], 1):
                try:
                    rounds.append(json.loads(line))
                except json.JSONDecodeError as exc:
                    raise UserError(f"a damaged round ({exc.msg}); start a new --work", file=str(self.log), line=number)
            if lines[-1] or len(rounds) != (done["rounds"] if done else 0):  # the checkpoint names whole lines
                raise UserError(
                    f"holds {len(rounds)} whole rounds where {CHECKPOINT} records {done['rounds'] if done else 0}; "
                    "start a new --work",
                    file=str(self.log),
                )
            return rounds
        self.work.mkdir(parents=True, exist_ok=True)
        write_json_atomic(self.work / SETTINGS, settings)
        self.log.touch()
        return []

    def append(self, round_record: dict) -> None:
        with self.log.open("ab") as fh:
            fh.write((json.dumps(round_record, ensure_ascii=False) + "\n").encode("utf-8"))
            fh.flush()
            os.fsync(fh.fileno())
            size = fh.tell()
        write_json_atomic(self.checkpoint, {"rounds": round_record["round"] + 1, "bytes": size})


def run_self_instruct(
    seeds: list[Task],
    generate: GenerateFn,
    config: SelfInstructConfig,
    work: str | Path,
    *,
    model_name: str | None = None,
    generation: dict | None = None,
    resume: bool = False,
    progress: bool = True,
) -> SelfInstructResult:
    """Bootstrap `config.n` new tasks from `seeds`, recording progress in `work` (resumable). `generation`: the
    settings behind `generate` (sampling, length, dtype), which a resume must repeat to equal an uninterrupted run."""
    config.check()
    state = _Progress(Path(work))
    done = state.start(_settings(config, seeds, model_name, generation), resume)
    result = SelfInstructResult(tasks=[], rounds=0)
    pool = [(t.instruction, rouge_tokens(t.instruction)) for t in seeds]
    for record in done:
        _absorb(result, record, pool)
    max_rounds = config.max_rounds if config.max_rounds is not None else 20 * config.n
    bar = tqdm(
        total=config.n,
        initial=min(len(result.tasks), config.n),
        desc="self-instruct",
        unit="task",
        disable=not progress,
    )
    while len(result.tasks) < config.n and result.rounds < max_rounds:
        record = _round(result.rounds, seeds, result.tasks, pool, generate, config)
        state.append(record)
        before = len(result.tasks)
        _absorb(result, record, pool)
        bar.update(min(len(result.tasks), config.n) - min(before, config.n))
        bar.set_postfix(round=result.rounds, dropped=sum(result.dropped.values()))
    bar.close()
    result.complete = len(result.tasks) >= config.n
    result.tasks = result.tasks[: config.n]
    return result


def _absorb(result: SelfInstructResult, record: dict, pool: list) -> None:
    for t in record["kept"]:
        task = Task(t["instruction"], t["instances"], t["is_classification"])
        result.tasks.append(task)
        pool.append((task.instruction, rouge_tokens(task.instruction)))
    for d in record["dropped"]:
        result.dropped[d["reason"]] += 1
        examples = result.examples.setdefault(d["reason"], [])
        if len(examples) < _KEEP_EXAMPLES:
            examples.append(d["instruction"])
    result.rounds = record["round"] + 1


def _round(
    r: int, seeds: list[Task], generated: list[Task], pool: list, generate: GenerateFn, config: SelfInstructConfig
) -> dict:
    """One round: returns {"round", "kept": [task], "dropped": [{"instruction", "reason"}]}."""
    rng = random.Random(_derived_seed(config.seed, r, "sample"))
    dropped: list[dict] = []
    # 1. new instructions from in-context tasks: generated ones (when there are some) and seed ones
    prompts = []
    for _ in range(config.prompts_per_round):
        k_gen = min(config.in_context_generated, len(generated))
        shown = [t.instruction for t in rng.sample(generated, k_gen)]
        shown += [t.instruction for t in rng.sample(seeds, min(config.in_context - k_gen, len(seeds)))]
        rng.shuffle(shown)
        prompts.append(instruction_prompt(shown))
    texts = _call(generate, prompts, INSTRUCTION_STOP, _derived_seed(config.seed, r, "instructions"))
    # 2. the paper's heuristics, then diversity: ROUGE-L below the threshold against every task so far
    candidates: list[str] = []
    round_pool: list = []
    for text, hit_limit in texts:
        listed = parse_instructions(text)
        for n, ins in enumerate(listed, 1):
            ins = ins[:1].upper() + ins[1:]
            reason = "cut_at_limit" if hit_limit and n == len(listed) else instruction_drop_reason(ins)
            if reason is None:
                tokens = rouge_tokens(ins)
                best = max((rouge_l(tokens, t) for _, t in pool + round_pool), default=0.0)
                if best >= config.rouge_threshold:
                    reason = "similar"
                else:
                    round_pool.append((ins, tokens))
                    candidates.append(ins)
            if reason is not None:
                dropped.append({"instruction": ins, "reason": reason})
    if not candidates:
        return {"round": r, "kept": [], "dropped": dropped}
    # 3. classification or not, few-shot from the seed tasks' own labels
    shots = [rng.sample(seeds, min(config.classify_shots, len(seeds))) for _ in candidates]
    answers = _call(
        generate,
        [classify_prompt(s, c) for s, c in zip(shots, candidates)],
        CLASSIFY_STOP,
        _derived_seed(config.seed, r, "classify"),
        max_new_tokens=CLASSIFY_MAX_TOKENS,
    )
    is_clf = [parse_is_classification(a) for a, _ in answers]  # "Yes"/"No" then more: a limit hit is normal
    # 4. instances: input-first, or output-first for classification tasks
    prompts = []
    for c, clf in zip(candidates, is_clf):
        same_kind = [t for t in seeds if t.is_classification == clf] or seeds
        prompts.append(instance_prompt(rng.sample(same_kind, min(config.instance_shots, len(same_kind))), c, clf))
    texts = _call(generate, prompts, INSTANCE_STOP, _derived_seed(config.seed, r, "instances"))
    kept = []
    for c, clf, (text, hit_limit) in zip(candidates, is_clf, texts):
        if hit_limit:
            dropped.append({"instruction": c, "reason": "cut_at_limit"})
            continue
        instances = clean_instances(parse_instances(text, clf))
        if not instances:
            dropped.append({"instruction": c, "reason": "no_valid_instance"})
            continue
        kept.append(Task(c, instances, clf).to_json())
    return {"round": r, "kept": kept, "dropped": dropped}


def _call(
    generate: GenerateFn, prompts: list[str], stop: tuple[str, ...], seed: int, max_new_tokens: int | None = None
) -> list[tuple[str, bool]]:
    """(text cut at the first stop string, whether the generation ran to its token limit) per prompt."""
    replies = generate(prompts, stop=stop, seed=seed, max_new_tokens=max_new_tokens)
    if len(replies) != len(prompts):
        raise RuntimeError(f"the generator returned {len(replies)} texts for {len(prompts)} prompts")
    plain = [(r, False) if isinstance(r, str) else (r.text, r.hit_limit) for r in replies]
    return [(cut_at_stop(text, stop), hit_limit) for text, hit_limit in plain]


def model_generator(
    model, tokenizer, *, max_new_tokens: int = 128, temperature: float = 0.7, batch_size: int = 8
) -> GenerateFn:
    """A GenerateFn over `deltatune.evaluate.generate` (raw prompts, no chat template, as in the paper)."""
    from deltatune.evaluate.generate import GenerationConfig, generate_detailed

    if max_new_tokens < 1:
        raise ConfigError(f"must be at least 1, got {max_new_tokens}", field="--max-new-tokens")
    default_max = max_new_tokens

    def fn(
        prompts: list[str], *, stop: tuple[str, ...], seed: int, max_new_tokens: int | None = None
    ) -> list[Generation]:
        limit = min(max_new_tokens, default_max) if max_new_tokens else default_max
        cfg = GenerationConfig(
            max_new_tokens=limit, do_sample=temperature > 0, temperature=temperature or 1.0, seed=seed, stop=stop
        )
        return generate_detailed(model, tokenizer, prompts, cfg, batch_size=batch_size, progress=False)

    return fn


def write_outputs(result: SelfInstructResult, out: str | Path | None, work: str | Path) -> int:
    """The Alpaca records to `out` (None: none), and the kept tasks (seed format) and the report into `work`; all
    atomic."""
    write_jsonl_atomic(Path(work) / TASKS, [t.to_json() for t in result.tasks])
    write_json_atomic(Path(work) / REPORT, result.report())
    return write_jsonl_atomic(out, result.records()) if out is not None else 0
