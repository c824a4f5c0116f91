"""Run one task on one model: build prompts (with shots), generate or score options, compute metrics."""

from __future__ import annotations

import sys
from dataclasses import dataclass, field, replace
from typing import Any

from deltatune.errors import UserError
from deltatune.evaluate import metrics as M
from deltatune.evaluate.choice import (
    OptionError,
    choice_accuracies,
    model_max_length,
    option_problem,
    predict,
    score_options,
    split_encode,
)
from deltatune.evaluate.extract import extract_bbh, extract_gsm8k
from deltatune.evaluate.generate import GenerationConfig, generate
from deltatune.evaluate.loss import loss_on_file, loss_options
from deltatune.evaluate.prompts import default_style, letter_question, pick_shots, render, style_info
from deltatune.evaluate.tasks import LETTERS, Item, Task, load_items, load_shot_pool


@dataclass
class EvalOptions:
    limit: int | None = None
    shots: int = 0
    seed: int = 0
    batch_size: int = 8
    style: str | None = None  # None: chat if the tokenizer has a template, else plain
    choice_mode: str = "option"  # "option" (likelihood of the answer text) | "letter"
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    max_new_tokens: int | None = None  # None: the task's own
    progress: bool = True
    template: str = "auto"  # loss tasks: the training template and loss policy
    policy: str = "response"
    max_len: int = 1024
    flat_rows: bool | None = None  # loss tasks: each batch end to end in one unpadded row (None: on CPU)
    samples: int = 1  # code tasks: completions per problem (n of pass@k)
    pass_k: tuple[int, ...] = (1,)  # code tasks: the k of pass@k reported (those <= samples)
    allow_code_execution: bool = False
    exec_timeout: float = 10.0  # code tasks: wall-clock seconds per sample
    exec_memory_mb: int = 1024
    exec_workers: int | None = None  # default: the core count

    def __post_init__(self) -> None:
        """The checks `deltatune eval` makes of its flags, for callers of the Python API (limit=-1 dropped the
        last item, a misspelt choice_mode scored as "option", batch_size=0 was a traceback)."""
        for name in ("limit", "batch_size", "max_new_tokens", "samples"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise UserError(f"must be at least 1, got {value}", field=name)
        if self.shots < 0:
            raise UserError(f"must be 0 or more, got {self.shots}", field="shots")
        if self.choice_mode not in ("option", "letter"):
            raise UserError(f"must be 'option' or 'letter', got {self.choice_mode!r}", field="choice_mode")


@dataclass
class TaskResult:
    task: str
    n: int
    metric: str  # the headline metric's key
    metrics: dict[str, float]
    predictions: list[dict[str, Any]]
    higher_is_better: bool = True
    info: dict[str, Any] = field(default_factory=dict)  # how it was measured (code: samples, isolation)

    @property
    def score(self) -> float:
        return self.metrics[self.metric]


def _shots_for(item: Item, pool: list[Item] | None, opts: EvalOptions) -> list[Item]:
    """Shots from the same group (MMLU subject, BBH task) when the pool has groups, never the item itself."""
    if opts.shots <= 0 or pool is None:
        return []
    same_group = [p for p in pool if p.group == item.group]
    return pick_shots(same_group or pool, opts.shots, opts.seed, exclude=item)


def check_task_options(task: Task, items: list[Item], opts: EvalOptions) -> None:
    """What `evaluate_task` would refuse about the options, found without a model: the CLIs call it for every task
    before the model loads, so `--policy nonsense` or too many `--shots` is not found after earlier tasks ran
    (for hours) and nothing was written. `--shots` on a task that takes none is said on stderr."""
    if opts.shots > 0 and task.kind in ("loss", "code"):  # a loss file or a code problem is scored as it is
        print(
            f"warning: --shots does not apply to {task.name} (a {task.kind} task); scored without shots",
            file=sys.stderr,
        )
    if task.kind == "loss":
        loss_options(opts.policy, opts.template, opts.max_len)
        return
    if task.kind == "code" or opts.shots <= 0:
        return
    pool = load_shot_pool(task) or load_items(task)
    first_of_group: dict[str, Item] = {}
    for item in items:
        first_of_group.setdefault(item.group, item)
    for item in first_of_group.values():  # raises as evaluate_task would when a group has too few examples
        _shots_for(item, pool, opts)


def _score_generation(task: Task, item: Item, text: str) -> dict[str, float | str | None]:
    if task.extract == "gsm8k":
        strict, flexible = extract_gsm8k(text, strict=True), extract_gsm8k(text, strict=False)
        return {
            "extracted": strict,
            "exact_match": M.exact_match(strict, item.target),
            "exact_match_flexible": M.exact_match(flexible, item.target),
        }
    if task.extract == "bbh":
        pred = extract_bbh(text, item.target)
        return {"extracted": pred, "exact_match": M.exact_match(pred, item.target)}
    return {
        "extracted": text.strip(),
        # SQuAD's exact match, normalised as its F1 beside it ("The Eiffel Tower" = "Eiffel Tower")
        "exact_match": M.exact_match(M.normalize_text(text), M.normalize_text(item.target)),
        "f1": M.token_f1(text, item.target),
        "rouge_l": M.rouge_l(text, item.target),
    }


def evaluate_task(
    model, tokenizer, task: Task, opts: EvalOptions | None = None, items: list[Item] | None = None
) -> TaskResult:
    """Score `model` on `task` (on `items` if given: read them first to fail before loading a model)."""
    opts = opts or EvalOptions()
    if task.kind == "loss":
        res = loss_on_file(
            model,
            tokenizer,
            task.files[0],
            template=opts.template,
            policy=opts.policy,
            column_map={column: name for name, column in task.field_map.items()} or None,  # {column: field}
            max_len=opts.max_len,
            limit=opts.limit,
            batch_size=opts.batch_size,
            progress=opts.progress,
            flat=opts.flat_rows,
        )
        note = res.note(opts.max_len)
        if note:
            print(f"note: {task.name}: {note}", file=sys.stderr)
        info = {
            "template": res.template,
            "policy": opts.policy,
            "max_len": opts.max_len,
            "map": dict(task.field_map) or None,
            "read": res.read,
            "truncated": res.truncated,
            "dropped": res.dropped,
        }
        return TaskResult(task.name, res.examples, "loss", res.as_dict(), [], higher_is_better=False, info=info)
    items = items if items is not None else load_items(task, opts.limit)
    if task.kind == "code":
        return _evaluate_code(model, tokenizer, task, items, opts)
    pool = None
    if opts.shots > 0:  # the training split, else the whole task (not just the first --limit items)
        pool = load_shot_pool(task) or load_items(task)
    style = style_info(opts.style or default_style(tokenizer), tokenizer)
    add_special = style.name != "chat"
    if task.kind == "choice":
        return _evaluate_choice(model, tokenizer, task, items, pool, opts, style, add_special)
    prompts = []
    suffix = task.zero_shot_suffix if opts.shots == 0 else ""
    for item in items:
        shots = [(s.prompt, s.shot_answer) for s in _shots_for(item, pool, opts)]
        prompts.append(render(tokenizer, style.name, shots, item.prompt + suffix))
    gen = replace(
        opts.generation,
        max_new_tokens=opts.max_new_tokens or task.max_new_tokens,
        stop=tuple(opts.generation.stop) + style.stop,
    )
    texts = generate(
        model,
        tokenizer,
        prompts,
        gen,
        batch_size=opts.batch_size,
        add_special_tokens=add_special,
        progress=opts.progress,
    )
    rows = []
    for item, text in zip(items, texts):
        rows.append(
            {"source": item.source, "target": item.target, "output": text, **_score_generation(task, item, text)}
        )
    keys = [k for k in rows[0] if k not in {"source", "target", "output", "extracted"}]
    metrics = {k: M.mean([float(r[k]) for r in rows]) for k in keys}
    info = {
        "protocol": f"{opts.shots}-shot" + (", answer format stated in the prompt" if suffix else ""),
        **generation_info(gen, style.label),
    }
    return TaskResult(task.name, len(items), task.metric, metrics, rows, info=info)


def generation_info(gen: GenerationConfig, style: str) -> dict[str, Any]:
    """The settings that change a generation task's texts, for results.json (resolved: the task's own length,
    the style the tokenizer chose)."""
    info: dict[str, Any] = {"prompt_style": style, "max_new_tokens": gen.max_new_tokens, "sample": gen.do_sample}
    if gen.do_sample:
        info.update(temperature=gen.temperature, top_p=gen.top_p, seed=gen.seed)
    return info


def choice_inputs(tokenizer, items: list[Item], pool, opts: EvalOptions, style) -> tuple[list[str], list[list[str]]]:
    """(contexts, options) of a choice task as it is scored: shots, prompt style, option or letter."""
    contexts = [choice_context(tokenizer, item, pool, opts, style) for item in items]
    return contexts, [choice_options(item, opts, style) for item in items]


def choice_context(tokenizer, item: Item, pool, opts: EvalOptions, style) -> str:
    """An item's question as scored: its shots and the prompt style rendered (a chat template: the slow part)."""
    shots = _shots_for(item, pool, opts)
    if opts.choice_mode == "letter":
        pairs = [(letter_question(s), LETTERS[s.answer]) for s in shots]
        return render(tokenizer, style.name, pairs, letter_question(item))
    pairs = [(s.prompt, s.options[s.answer]) for s in shots]
    return render(tokenizer, style.name, pairs, item.prompt)


def choice_options(item: Item, opts: EvalOptions, style) -> list[str]:
    """An item's options as scored: each letter or option text after the style's continuation prefix."""
    if opts.choice_mode == "letter":
        return [style.continuation_prefix + LETTERS[i] for i in range(len(item.options))]
    return [style.continuation_prefix + o for o in item.options]


def _option_error(item: Item, option: int, problem: str) -> UserError:
    """One line naming the item's file and line (MMLU's `path:line`)."""
    file, _, line = item.source.rpartition(":")
    where = {"file": file, "line": int(line)} if file and line.isdigit() else {"file": item.source or None}
    return UserError(f"option {LETTERS[option]} {problem}; fix or remove the item", **where)


def check_choice_fits(model, tokenizer, task: Task, items: list[Item], opts: EvalOptions) -> None:
    """Refuse an option that encodes to no tokens or does not fit the model's context, naming its file and line,
    before any task runs (score_options would raise in the middle of the run, after earlier tasks' hours).
    Options are encoded alone in one batch; only those near the limit (a boundary merge moves a token or two) or
    empty get the exact split that scoring uses, so only their questions are rendered (rendering every question,
    shots and chat template included, repeated the scoring run's own rendering)."""
    if task.kind != "choice" or not items:
        return
    pool = (load_shot_pool(task) or load_items(task)) if opts.shots > 0 else None
    style = style_info(opts.style or default_style(tokenizer), tokenizer)
    options = [choice_options(item, opts, style) for item in items]
    max_length = model_max_length(model)
    flat = [text for row in options for text in row]
    alone = tokenizer(flat, add_special_tokens=False)["input_ids"] if flat else []
    at = 0
    for q, row in enumerate(options):
        for o, text in enumerate(row):
            n = len(alone[at])
            at += 1
            if 0 < n < max_length - 8 and text.strip():
                continue
            context = choice_context(tokenizer, items[q], pool, opts, style)
            _, o_ids = split_encode(tokenizer, context, text, style.name != "chat")
            problem = option_problem(o_ids, text, max_length)
            if problem:
                raise _option_error(items[q], o, problem)


def _evaluate_choice(model, tokenizer, task, items, pool, opts, style, add_special) -> TaskResult:
    letter = opts.choice_mode == "letter"
    contexts, options = choice_inputs(tokenizer, items, pool, opts, style)
    try:
        scores = score_options(
            model,
            tokenizer,
            contexts,
            options,
            batch_size=opts.batch_size,
            add_special_tokens=add_special,
            progress=opts.progress,
            # acc divides by len(choice) of the option as written, as lm-eval's acc_norm (spaces around it included)
            char_counts=[[len(o) - len(style.continuation_prefix) for o in row] for row in options],
        )
    except OptionError as exc:
        raise _option_error(items[exc.question], exc.option, exc.problem) from None
    answers = [item.answer for item in items]
    metrics = choice_accuracies(scores, answers)
    if letter:  # every letter has one character and (usually) one token: the three agree; keep one
        metrics = {"acc": metrics["acc_sum"]}
    rows = [
        {
            "source": it.source,
            "target": it.target,
            "predicted": LETTERS[predict(s, "sum" if letter else "char")],
            "logprobs": [round(o.logprob, 4) for o in s],
        }
        for it, s in zip(items, scores)
    ]
    info = {
        "choice": "letter" if letter else "option likelihood",
        "prompt_style": style.label,
        "shots_from": "none"
        if opts.shots == 0
        else ("the training split" if task.fewshot_files else "the same file (test split) minus the item"),
    }
    return TaskResult(task.name, len(items), "acc", metrics, rows, info=info)


def check_code_options(opts: EvalOptions, task: Task | None = None, generating: bool = False) -> None:
    """Code tasks run generated programs: only with the explicit opt-in; generating n > 1 samples needs sampling.
    Called before any model loads, so a wrong flag costs nothing."""
    if not opts.allow_code_execution:
        raise UserError(
            f"task '{task.name if task else 'code'}' runs model-written programs; pass "
            "--allow-code-execution to allow it (see docs/evaluation.md, Code execution)",
            field="allow-code-execution",
        )
    if opts.samples < 1:
        raise UserError("must be at least 1", field="samples")
    if any(k < 1 for k in opts.pass_k):
        raise UserError("every k must be at least 1", field="pass-k")
    if generating and opts.samples > 1 and not opts.generation.do_sample:
        raise UserError(
            "more than one sample per problem needs sampling: add --sample (and --temperature)", field="samples"
        )


def _evaluate_code(model, tokenizer, task: Task, items: list[Item], opts: EvalOptions) -> TaskResult:
    from deltatune.evaluate.code import HUMANEVAL_STOP, clean_completion

    check_code_options(opts, task, generating=True)
    problems = [it.problem for it in items]
    style = style_info(opts.style or default_style(tokenizer), tokenizer)
    if problems[0].format == "humaneval":  # the code itself is the prompt: a plain continuation, with the BOS the
        # tokenizer gives any text (as lm-eval and bigcode's harness encode it)
        prompts, stop, add_special = [p.prompt for p in problems], HUMANEVAL_STOP, True
    else:
        prompts = [render(tokenizer, style.name, [], p.generation_prompt()) for p in problems]
        stop, add_special = style.stop, style.name != "chat"
    gen = replace(
        opts.generation,
        max_new_tokens=opts.max_new_tokens or task.max_new_tokens,
        stop=tuple(opts.generation.stop) + tuple(stop),
        stop_outside_fences=True,  # a fenced answer holds "\ndef " and the like; clean_completion unfences it
    )
    n = opts.samples
    texts = generate(
        model,
        tokenizer,
        [p for p in prompts for _ in range(n)],
        gen,
        batch_size=opts.batch_size,
        add_special_tokens=add_special,
        progress=opts.progress,
    )
    completions = [[clean_completion(p, t) for t in texts[i * n : (i + 1) * n]] for i, p in enumerate(problems)]
    result = score_code(task.name, problems, completions, opts)
    # HumanEval's prompt is code the model continues: no prompt style applies
    used = "continuation" if problems[0].format == "humaneval" else style.label
    result.info.update(generation_info(gen, used))
    return result


def score_code(name: str, problems: list, completions: list[list[str]], opts: EvalOptions) -> TaskResult:
    """Run every completion's program and report pass@k; one row per problem in the predictions."""
    from deltatune.evaluate.code import pass_at_k_table
    from deltatune.evaluate.execution import Limits, isolation, run_programs

    check_code_options(opts)
    programs = [p.program(c) for p, cs in zip(problems, completions) for c in cs]
    outcomes = run_programs(
        programs,
        Limits(timeout_s=opts.exec_timeout, memory_mb=opts.exec_memory_mb),
        workers=opts.exec_workers,
        progress=opts.progress,
    )
    rows, counts, at = [], [], 0
    for p, cs in zip(problems, completions):
        mine = outcomes[at : at + len(cs)]
        at += len(cs)
        counts.append((len(cs), sum(o.passed for o in mine)))
        rows.append(
            {
                "source": p.source,
                "task_id": p.task_id,
                "n": len(cs),
                "passed": counts[-1][1],
                "completions": cs,
                "status": [o.status for o in mine],
            }
        )
    metrics = pass_at_k_table(counts, opts.pass_k)
    skipped = [k for k in opts.pass_k if f"pass@{k}" not in metrics]
    if skipped:
        print(f"note: pass@{skipped[0]} needs at least {skipped[0]} samples per problem; not reported")
    return TaskResult(
        name,
        len(problems),
        "pass@1",
        metrics,
        rows,
        info={
            "samples_per_problem": min(n for n, _ in counts),
            "isolation": isolation(),
            "timeout_s": opts.exec_timeout,
            "memory_mb": opts.exec_memory_mb,
        },
    )
