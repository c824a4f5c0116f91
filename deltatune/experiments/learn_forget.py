"""learn-forget: "LoRA Learns Less and Forgets Less" (arXiv 2405.09673) on your model.

Math instruction finetuning on a GSM8K train subset with full finetuning, LoRA r=8/64/256
(alpha = 2r), DoRA r=8 and MoRA r=8, all linear layers. Each method sweeps 3 learning rates
(LoRA's grid ten times full finetuning's, as the paper finds); the rate is picked on a validation
split of GSM8K train (the held-out answer loss), never on the test set; the picked rate is run
again for every further seed. Measured at the end of each run, on the same items for the base
model and every run:
- target: GSM8K test exact match (strict '#### N', 0-shot with the format stated; see
  docs/evaluation.md), learning = gain over the base, a fraction;
- sources: MMLU (fixed subjects, option likelihood) and BIG-Bench Hard (fixed tasks) accuracies,
  forgetting = mean drop from the base, a fraction;
- held-out loss on the self-instruct reference answers (nats per token), in its own table;
- the loss on the reference solutions of the same GSM8K test problems (nats per token): a learning
  measure that moves where exact match cannot (a 135M model solves ~0 of them before and after),
  in the loss tables and its own plot, never averaged with accuracies;
- the spectrum of each run's weight change dW: rank needed for 90% of ||dW||^2, per layer type.
Runs measured before a measure was added get it from their saved final weights when the experiment is
resumed (`_backfill`), so adding a measure never retrains.
Outputs: results.json/md, learn_forget.png (each method's rates joined, as the paper's figure),
learn_forget_loss.png (the same with the GSM8K test-loss decrease as learning) and spectrum.png
(rank@90% per layer type, full finetuning against the adapters).
fp32 by default; --precision bf16 trains and measures under bf16 autocast (several times faster where the
CPU has AVX-512 bf16 or AMX).
"""

from __future__ import annotations

import json
import math
import random
import statistics
import time
from pathlib import Path
from typing import Any

from deltatune.errors import UserError
from deltatune.experiments.common import DONE, POLL_SECONDS, Context, Run, markdown_table, write_atomic

HELP = "LoRA learns less and forgets less: GSM8K gain vs MMLU/BBH drop per method and learning rate"
DEFAULT_SEEDS = 2
# options that only choose which runs to do: a restart may add seeds or methods to a finished experiment
RUN_SELECTORS = ("seeds", "methods")
PARALLEL_RUNS = True  # --jobs: worker processes train runs and score a base; only the invoked process reports

# name -> (method, rank, learning rates); alpha = 2 * rank. LoRA-family grids are 10x full finetuning's.
METHODS: dict[str, tuple[str, int | None, tuple[float, ...]]] = {
    "full": ("full", None, (1e-5, 3e-5, 1e-4)),
    "lora-r8": ("lora", 8, (1e-4, 3e-4, 1e-3)),
    "lora-r64": ("lora", 64, (1e-4, 3e-4, 1e-3)),
    "lora-r256": ("lora", 256, (1e-4, 3e-4, 1e-3)),
    "dora-r8": ("dora", 8, (1e-4, 3e-4, 1e-3)),
    "mora-r8": ("mora", 8, (1e-4, 3e-4, 1e-3)),
}
# the order runs are trained in: slowest first (measured per run in the recorded run, docs/experiments.md)
TRAIN_ORDER = ("dora-r8", "lora-r256", "mora-r8", "lora-r64", "full", "lora-r8")
MMLU_SUBJECTS = "high_school_geography+high_school_psychology+marketing+nutrition"
BBH_TASKS = "boolean_expressions+sports_understanding+navigate"
# full mode: sized for 90 minutes on 2 cores with --jobs 2 (docs/experiments.md); quick: the tiny model, seconds
SIZES = {
    "full": dict(
        train=160,
        val=32,
        epochs=1.0,  # one pass: packing fits ~14.5 of the 160 examples in a step of 8 rows, so 11 steps
        batch=8,
        seq_len=512,
        gsm8k=40,
        mmlu=20,
        bbh=12,
        selfinstruct=60,
        max_new_tokens=160,
        bbh_tokens=48,
        eval_batch=16,  # loss and option likelihood: longer batches pad more (batch 40 took 2x as long)
        generate_batch=40,  # every GSM8K problem in one generation batch: 1.8x batch 8 (docs/benchmarks.md)
    ),
    "quick": dict(
        train=8,
        val=4,
        steps=2,
        batch=4,
        seq_len=512,
        gsm8k=2,
        mmlu=2,
        bbh=2,
        selfinstruct=3,
        max_new_tokens=8,
        bbh_tokens=4,
        eval_batch=4,
        generate_batch=4,
    ),
}


def add_arguments(p) -> None:
    p.add_argument("--methods", default=",".join(METHODS), help=f"comma subset of {', '.join(METHODS)}")
    p.add_argument("--lrs", type=int, default=3, help="learning rates per method, from the grid (default 3)")
    p.add_argument("--train-examples", type=int, default=None, help="GSM8K train examples (full: 160)")
    p.add_argument(
        "--epochs",
        type=float,
        default=None,
        help="passes over the train examples, as packed into rows: the first pass's step count times E, "
        "rounded up (default 1; --epochs 1.8 trains 20 steps, as the first recorded run did, in a new --out)",
    )
    p.add_argument("--gsm8k-test", type=int, default=None, help="GSM8K test problems scored (full: 40)")
    p.add_argument("--mmlu-per-subject", type=int, default=None, help=f"questions per subject of {MMLU_SUBJECTS}")
    p.add_argument("--bbh-per-task", type=int, default=None, help=f"items per task of {BBH_TASKS}")
    p.add_argument(
        "--precision",
        choices=("fp32", "bf16"),
        default="fp32",
        help="fp32 (default), or bf16 autocast with fp32 master weights (adapters keep the frozen base in bf16): "
        "several times faster on CPUs with AVX-512 bf16 or AMX, and on GPUs",
    )


def defining_settings(args) -> dict[str, Any]:
    """The sizes this invocation resolves to, defaults included, for the folder's manifest: a folder made
    under other defaults (the earlier fixed 20 steps, generation at batch 16) is refused, not mixed."""
    return {"sizes": _sizes(args.quick, args)}


def _sizes(quick: bool, args) -> dict[str, Any]:
    s = dict(SIZES["quick" if quick else "full"])
    for key, arg in (
        ("train", "train_examples"),
        ("epochs", "epochs"),
        ("gsm8k", "gsm8k_test"),
        ("mmlu", "mmlu_per_subject"),
        ("bbh", "bbh_per_task"),
    ):
        if getattr(args, arg) is not None:
            if not (math.isfinite(getattr(args, arg)) and getattr(args, arg) > 0):  # NaN passed to the first run
                raise UserError("must be a positive number", field=arg.replace("_", "-"))
            s[key] = getattr(args, arg)
    return s


def check_arguments(args) -> None:
    """Refuse bad --methods / --lrs and sizes before the output folder is claimed and the base model scored."""
    _methods(args)
    sizes = _sizes(args.quick, args)
    if getattr(args, "train_examples", None) is not None:
        from deltatune.evaluate.tasks import data_root, read_gsm8k

        available = len(read_gsm8k(data_root() / "gsm8k" / "train.jsonl"))
        if sizes["train"] + sizes["val"] > available:  # else the validation split came out short or empty: every
            raise UserError(  # run trained, then the report stopped on a missing validation loss (a traceback)
                f"at most {available - sizes['val']} (GSM8K train has {available}; {sizes['val']} are held out "
                "for validation)",
                field="train-examples",
            )


def _methods(args) -> list[str]:
    names = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in names if m not in METHODS]
    if unknown or not names:
        raise UserError(
            f"unknown method '{unknown[0] if unknown else ''}'; choose from {', '.join(METHODS)}", field="methods"
        )
    if len(set(names)) != len(names):  # each method names its runs: a repeat would make the same runs twice
        raise UserError(f"names a method twice: '{args.methods}'", field="methods")
    if not 1 <= args.lrs <= 3:
        raise UserError("must be 1, 2 or 3", field="lrs")
    return names


def gsm8k_records(sizes: dict, seed: int = 1234) -> tuple[list[dict], list[dict]]:
    """Train and validation records from GSM8K train (disjoint, a fixed shuffle); the question carries the
    same answer-format sentence as the 0-shot evaluation prompt, so training and test prompts agree."""
    from deltatune.evaluate.tasks import GSM8K_ZERO_SHOT, data_root, read_gsm8k

    items = read_gsm8k(data_root() / "gsm8k" / "train.jsonl")
    order = list(range(len(items)))
    random.Random(seed).shuffle(order)
    recs = [{"instruction": items[i].prompt + GSM8K_ZERO_SHOT, "output": items[i].shot_answer} for i in order]
    return recs[: sizes["train"]], recs[sizes["train"] : sizes["train"] + sizes["val"]]


def _selfinstruct_file(ctx: Context, n: int) -> Path:
    """The first n self-instruct user-oriented instructions with their reference outputs, in training format."""
    from deltatune.evaluate.tasks import data_root, read_self_instruct

    items = read_self_instruct(data_root() / "self-instruct" / "user_oriented_instructions.jsonl")[:n]
    text = "".join(json.dumps({"instruction": it.prompt, "output": it.target}) + "\n" for it in items)
    return _data_file(ctx.out / "data" / "selfinstruct_heldout.jsonl", text)


def _gsm8k_test_file(ctx: Context, items: list) -> Path:
    """The scored GSM8K test problems with their reference solutions, in training format (prompt as trained)."""
    from deltatune.evaluate.tasks import GSM8K_ZERO_SHOT

    rows = [{"instruction": it.prompt + GSM8K_ZERO_SHOT, "output": it.shot_answer} for it in items]
    return _data_file(ctx.out / "data" / "gsm8k_test_answers.jsonl", "".join(json.dumps(r) + "\n" for r in rows))


def _data_file(path: Path, text: str) -> Path:
    """`path` holding `text`: written when absent or different (a folder retaken after a failed set-up under
    other sizes must not score the earlier attempt's items), left alone when the same (resumed runs)."""
    if not path.exists() or path.read_text(encoding="utf-8") != text:
        write_atomic(path, text)
    return path


class Measures:
    """The tasks, their items (read once) and the base model, to score any model the same way."""

    def __init__(self, ctx: Context, sizes: dict, precision: str = "fp32") -> None:
        from deltatune.evaluate.runner import EvalOptions
        from deltatune.evaluate.tasks import load_items, resolve_task
        from deltatune.models import load_model

        self.sizes = sizes
        self.target = resolve_task("gsm8k")
        self.sources = [resolve_task(f"mmlu:{MMLU_SUBJECTS}"), resolve_task(f"bbh:{BBH_TASKS}")]
        self.loss = resolve_task(f"loss:{_selfinstruct_file(ctx, sizes['selfinstruct'])}")
        limits = {
            self.target.name: sizes["gsm8k"],
            self.sources[0].name: sizes["mmlu"],
            self.sources[1].name: sizes["bbh"],
        }
        self.items = {t.name: load_items(t, limits[t.name]) for t in [self.target, *self.sources]}
        self.target_loss = resolve_task(f"loss:{_gsm8k_test_file(ctx, self.items[self.target.name])}")
        self.loss_keys = {self.loss.name: "selfinstruct_loss", self.target_loss.name: "gsm8k_test_loss"}
        self.tokens = {self.target.name: sizes["max_new_tokens"], self.sources[1].name: sizes["bbh_tokens"]}
        self.generate_batch = sizes["generate_batch"]
        self.opts = EvalOptions(batch_size=sizes["eval_batch"], progress=False, template="tokenizer", max_len=1024)
        self.model_name, self.precision = ctx.model, precision
        self.base, self.tokenizer = load_model(ctx.model, dtype="fp32")
        self.base.eval()
        self._bf16_base = None

    @property
    def tasks(self) -> list:
        return [self.target, *self.sources, self.loss, self.target_loss]

    def missing(self, scores: dict[str, Any]) -> list:
        """The tasks whose score `scores` lacks (measured before the task was added)."""
        return [t for t in self.tasks if self.loss_keys.get(t.name, t.name) not in scores]

    def start_model(self, frozen: bool):
        """The model a run starts from, as it is scored. In bf16 the two kinds of run start from different
        bases: adapter methods from bf16 weights (frozen = True), full finetuning from fp32 master weights."""
        import torch

        from deltatune.models import load_model

        if self.precision == "fp32" or not frozen:
            return self.base
        if self._bf16_base is None:  # loaded once: the base scores and the backfill share it
            self._bf16_base = load_model(self.model_name, dtype=torch.bfloat16)[0].eval()
        return self._bf16_base

    def base_scores(self, frozen: bool, tasks: list | None = None) -> dict[str, Any]:
        """The base model scored as the runs are (under bf16 autocast in bf16); each run's learning and
        forgetting are measured against its own start."""
        return self.scores(self.start_model(frozen), tasks)

    def scores(self, model, tasks: list | None = None) -> dict[str, Any]:
        """Headline score of every task (fractions), the held-out losses (nats) and the item counts."""
        from contextlib import nullcontext
        from dataclasses import replace

        import torch

        from deltatune.evaluate.runner import evaluate_task

        autocast = (
            torch.autocast(model.device.type, dtype=torch.bfloat16) if self.precision == "bf16" else nullcontext()
        )
        out: dict[str, Any] = {"n": {}, "eval_seconds": {}}
        for task in self.tasks if tasks is None else tasks:
            opts = replace(self.opts, max_new_tokens=self.tokens.get(task.name))
            if task.name in self.tokens:  # a generation task
                opts = replace(opts, batch_size=self.generate_batch)
            start = time.perf_counter()
            with autocast:
                res = evaluate_task(model, self.tokenizer, task, opts, self.items.get(task.name))
            out["eval_seconds"][task.name] = round(time.perf_counter() - start, 2)
            out["n"][task.name] = res.n
            out[self.loss_keys.get(task.name, task.name)] = res.score
            if task is self.target:
                out["gsm8k_flexible"] = res.metrics["exact_match_flexible"]
        return out

    def spectrum(self, model) -> list[dict]:
        """rank@90% of dW per layer type (mean, max, full rank) against the base weights."""
        from deltatune.analysis.decompose import matrix_pairs
        from deltatune.analysis.spectrum import spectrum_rows, summarise_by_type

        return summarise_by_type(spectrum_rows(matrix_pairs(model, self.base), 0.9, top=0))


def _config(method: str, rank: int | None, lr: float, seed: int, length: dict, sizes: dict, precision: str) -> dict:
    """A run's TrainConfig; `length` is {"steps": n} or {"epochs": e} (passes over the packed examples)."""
    cfg = {
        **length,
        "method": method,
        "lr": lr,
        "seed": seed,
        "batch_size": sizes["batch"],
        "seq_len": sizes["seq_len"],
        "precision": precision,
        "template": "tokenizer",
        "targets": "all-linear",
        "warmup_ratio": 0.1,
        "schedule": "cosine",
        "log_every": 10,
    }  # fused norms as the training default (off in --quick): measured -1 s of a 10.7 s LoRA step here
    if rank is not None:
        cfg.update(rank=rank, alpha=2.0 * rank, dropout=0.05)
    return cfg


def _run_name(name: str, lr: float, seed: int) -> str:
    return f"{name}-lr{lr:g}-s{seed}"


def _pick(sweep_runs: list[dict]) -> float:
    """The rate with the lowest validation loss (a diverged run's NaN never wins)."""
    ok = [r for r in sweep_runs if r.get("eval_loss") is not None and math.isfinite(r["eval_loss"])]
    return min(ok or sweep_runs, key=lambda r: r.get("eval_loss") or math.inf)["lr"]


def run(ctx: Context, args) -> None:
    from deltatune.evaluate.forgetting import learn_forget

    names = _methods(args)
    sizes = _sizes(ctx.quick, args)
    train_recs, val_recs = gsm8k_records(sizes)
    if sizes.get("epochs"):
        length = {"epochs": sizes.pop("epochs")}
        sizes.pop("steps", None)
    else:
        length = {"steps": sizes["steps"]}
        if getattr(args, "train_examples", None) is not None:
            ctx.say(
                f"[learn-forget] --train-examples without --epochs: every run trains the mode's fixed {length['steps']} "
                "steps whatever the number of examples; give --epochs to train passes over them"
            )
    sizes.update(length)
    precision = getattr(args, "precision", "fp32")
    m = Measures(ctx, sizes, precision)
    base_files = {"adapters": ("base.json", True)}
    if precision == "bf16" and "full" in names:
        base_files["full"] = ("base-full.json", False)
    # with --jobs each process scores a base no other process is scoring, then trains; the report waits
    bases = {kind: _base(ctx, m, file, frozen, wait=False) for kind, (file, frozen) in base_files.items()}

    def measure(step: int, model) -> dict:
        return {"scores": m.scores(model), "spectrum": m.spectrum(model)}

    def make(name: str, lr: float, seed: int) -> Run:
        method, rank, _ = METHODS[name]
        return Run(
            _run_name(name, lr, seed),
            _config(method, rank, lr, seed, length, sizes, precision),
            records=train_recs,
            eval_records=val_recs,
            measure=measure,
            measure_last=True,
            meta={"method": name, "lr": lr, "seed": seed},
            # with --jobs, DoRA trains with no run beside it, on both processes' threads: a process training it
            # peaked at 13.6-14.3 GB (mostly glibc heap it no longer used: a fresh process trains it in 5.6 GB
            # of live tensors, docs/experiments.md), one training full finetuning at 9.4 GB, MoRA 8.6 GB
            alone=method == "dora",
        )

    first, rest = ctx.seeds[0], ctx.seeds[1:]
    grid = {n: METHODS[n][2][: args.lrs] for n in names}
    picked: dict[str, float] = {}

    def repeats(done: dict[str, dict]) -> list[Run]:
        """Each method's picked rate with the further seeds, as soon as the method's sweep is done (the
        other methods' sweeps may still be training)."""
        more = []
        for n in names:
            sweep_runs = [done.get(_run_name(n, lr, first)) for lr in grid[n]]
            if n not in picked and all(sweep_runs):
                picked[n] = _pick(sweep_runs)
                more += [make(n, picked[n], s) for s in rest]
        return more

    # DoRA's runs train alone and go first (Context.run_all); then the slowest first, so that the two
    # processes of --jobs 2 finish close together
    sweep = [make(n, lr, first) for n in sorted(names, key=TRAIN_ORDER.index) for lr in grid[n]]
    results = ctx.run_all(sweep, follow=repeats)
    if ctx.worker:
        return
    bases = {kind: bases[kind] or _base(ctx, m, file, frozen) for kind, (file, frozen) in base_files.items()}
    base = bases["adapters"]
    _backfill(ctx, m, results)

    tgt, srcs = m.target.name, [t.name for t in m.sources]
    rows = []
    # the report in the methods' order, whatever order the runs trained and finished in
    for r in sorted(results.values(), key=lambda r: (names.index(r["method"]), r["lr"], r["seed"])):
        sc = r["measured"][str(r["steps"])]["scores"]
        own = bases.get("full" if r["method"] == "full" else "adapters", base)
        lf = learn_forget(r["name"], own, sc, [tgt], srcs)
        rows.append(
            {
                "name": r["name"],
                "method": r["method"],
                "lr": r["lr"],
                "seed": r["seed"],
                "val_loss": r["eval_loss"],
                "learning": lf.learning,
                "forgetting": lf.forgetting,
                "scores": sc,
                "spectrum": r["measured"][str(r["steps"])]["spectrum"],
                "picked": r["lr"] == picked[r["method"]],
                "train_seconds": r["train_seconds"],
                "base_selfinstruct_loss": own["selfinstruct_loss"],
                "base_gsm8k_test_loss": own["gsm8k_test_loss"],
                # learning in nats: how much the reference solutions' loss fell (positive = learned)
                "learning_nats": own["gsm8k_test_loss"] - sc["gsm8k_test_loss"],
            }
        )
    steps = sorted({r["steps"] for r in results.values()})
    picked = {n: picked[n] for n in names}
    _report(ctx, names, bases, rows, picked, sizes, tgt, srcs, steps[0] if len(steps) == 1 else steps, precision)


def _base(ctx: Context, m: Measures, file: str, frozen: bool, wait: bool = True) -> dict[str, Any] | None:
    """The base model's scores, measured once per experiment folder (a resumed run reads them back and
    measures only what a later version added). While another process measures them: None without `wait`."""
    while (claim := ctx.claim(file)) is None:
        if not wait:
            return None
        time.sleep(POLL_SECONDS)
    # what the scores depend on besides the tasks: a folder retaken after a failed set-up holds an earlier
    # attempt's base.json, maybe of other sizes, another precision (bf16 weights and autocast) or another model
    # (the model as --model named it: the quick model's path is the folder's own)
    made_with = {"sizes": m.sizes, "precision": m.precision, "model": ctx.settings.get("model")}
    with claim:
        path = ctx.out / file
        scores = json.loads(path.read_text(encoding="utf-8")) if path.exists() else None
        if scores is not None and any(scores.get(k, v) != v for k, v in made_with.items()):  # (absent: older file)
            ctx.say("[learn-forget] base model: scores on file were measured with other settings; measuring again")
            scores = None
        if scores is not None:
            missing = m.missing(scores)
            if not missing:
                return scores
            ctx.say(f"[learn-forget] base model: measuring {', '.join(t.name for t in missing)} (added since)")
            scores = _merge_scores(scores, m.base_scores(frozen, missing))
        else:
            ctx.say(
                f"[learn-forget] scoring the base model{' (fp32 weights, for full finetuning)' if not frozen else ''}"
            )
            scores = m.base_scores(frozen)
        scores.update(made_with)
        write_atomic(path, json.dumps(scores, indent=2) + "\n")
        return scores


def _merge_scores(old: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
    merged = {**old, **{k: v for k, v in new.items() if k not in ("n", "eval_seconds")}}
    for key in ("n", "eval_seconds"):
        merged[key] = {**old.get(key, {}), **new[key]}
    return merged


def _backfill(ctx: Context, m: Measures, results: dict[str, dict]) -> None:
    """Measure what a finished run lacks (a measure added after it ran) on its saved final weights, and
    add it to its done.json (atomically). The run is loaded as it was measured: adapters on the bf16 base
    in bf16, full finetuning from its fp32 weights, both under the same autocast as the in-run measures."""
    import torch

    from deltatune.evaluate.runs import load_snapshot, read_run

    todo = [r for r in results.values() if m.missing(r["measured"][str(r["steps"])]["scores"])]
    if not todo:
        return
    adapter_base = None
    for i, r in enumerate(todo, 1):
        scores = r["measured"][str(r["steps"])]["scores"]
        missing = m.missing(scores)
        ctx.say(f"[learn-forget] {i}/{len(todo)} {r['name']}: measuring {', '.join(t.name for t in missing)}")
        info = read_run(ctx.run_dir(r["name"]))
        if info.final is None:
            raise UserError(f"{info.path} has no final weights to measure; delete the run folder to train it again")
        if info.final.kind == "adapter" and adapter_base is None:
            adapter_base = m.start_model(frozen=True)
        # as trained: fp32 adapter tensors over the bf16 (or fp32) base; full finetuning's fp32 weights
        model = load_snapshot(adapter_base, info, info.final, torch.float32, trainable_dtype=torch.float32).eval()
        r["measured"][str(r["steps"])]["scores"] = _merge_scores(scores, m.scores(model, missing))
        write_atomic(ctx.run_dir(r["name"]) / DONE, json.dumps(r, indent=2) + "\n")
        del model


def _mean_sd(values: list[float]) -> tuple[float, float | None]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else None)


def _report(ctx, names, bases, rows, picked, sizes, tgt, srcs, steps, precision) -> None:
    from deltatune.analysis.plots import learn_forget_plot, rank_by_type_plot

    ctx.keep_earlier_report()  # before the plots below replace its PNGs

    short = {tgt: "GSM8K EM", srcs[0]: "MMLU acc", srcs[1]: "BBH acc"}
    sweep_rows, head_rows, head_loss_rows, loss_rows, spec_rows, spec_plot = [], [], [], [], [], {}
    plot_rows, loss_plot_rows = [], []
    for r in sorted(rows, key=lambda r: (names.index(r["method"]), r["lr"], r["seed"])):
        sc = r["scores"]
        sweep_rows.append(
            [
                r["method"],
                f"{r['lr']:g}",
                r["seed"],
                r["val_loss"],
                sc[tgt],
                sc[srcs[0]],
                sc[srcs[1]],
                r["learning"],
                r["forgetting"],
                "yes" if r["picked"] else "",
            ]
        )
        loss_rows.append(
            [
                r["method"],
                f"{r['lr']:g}",
                r["seed"],
                r["base_gsm8k_test_loss"],
                sc["gsm8k_test_loss"],
                -r["learning_nats"],
                r["base_selfinstruct_loss"],
                sc["selfinstruct_loss"],
                sc["selfinstruct_loss"] - r["base_selfinstruct_loss"],
            ]
        )
        if r["seed"] == ctx.seeds[0]:
            plot_rows.append(
                {
                    "label": r["name"],
                    "group": r["method"],
                    "point_label": f"{r['lr']:g}",
                    "learning": r["learning"],
                    "forgetting": r["forgetting"],
                }
            )
            loss_plot_rows.append({**plot_rows[-1], "learning": r["learning_nats"]})
            if r["picked"]:
                spec_plot[r["method"]] = r["spectrum"]
                for s in r["spectrum"]:
                    size = s.get("rel_norm_mean", "-")  # runs measured before it was recorded have none
                    spec_rows.append([r["method"], s["type"], s["rank90_mean"], s["rank90_max"], s["full_rank"], size])
    for n in names:
        sel = [r for r in rows if r["method"] == n and r["picked"]]
        lm, ls = _mean_sd([r["learning"] for r in sel])
        fm, fs = _mean_sd([r["forgetting"] for r in sel])
        head_rows.append(
            [n, f"{picked[n]:g}", len(sel), statistics.fmean(r["scores"][tgt] for r in sel), lm, ls, fm, fs]
        )
        vm, vs = _mean_sd([r["val_loss"] for r in sel])
        tm, ts = _mean_sd([-r["learning_nats"] for r in sel])
        hm, hs = _mean_sd([r["scores"]["selfinstruct_loss"] - r["base_selfinstruct_loss"] for r in sel])
        head_loss_rows.append([n, f"{picked[n]:g}", len(sel), vm, vs, tm, ts, hm, hs])
    learn_forget_plot(
        plot_rows,
        ctx.out / "learn_forget.png",
        title=f"Learning vs forgetting (seed {ctx.seeds[0]}, points = learning rates)",
        x_unit="GSM8K exact match",
        y_unit="MMLU/BBH accuracy",
    )
    learn_forget_plot(
        loss_plot_rows,
        ctx.out / "learn_forget_loss.png",
        title=f"Learning as GSM8K test loss vs forgetting (seed {ctx.seeds[0]}, points = learning rates)",
        x_label="learning: decrease of GSM8K test solution loss (nats per token)",
        y_unit="MMLU/BBH accuracy",
    )
    rank_by_type_plot(spec_plot, ctx.out / "spectrum.png")
    base = bases["adapters"]
    n = base["n"]
    start = {"adapters": "bf16 weights (adapter runs)", "full": "fp32 weights (full finetuning)"}
    tables = [
        (
            f"Base model ({precision})",
            markdown_table(
                ["start", "GSM8K EM", "GSM8K flexible", "MMLU acc", "BBH acc", "GSM8K test loss", "self-instruct loss"],
                [
                    [start[k] if len(bases) > 1 else "all runs", b[tgt], b["gsm8k_flexible"], b[srcs[0]], b[srcs[1]]]
                    + [b["gsm8k_test_loss"], b["selfinstruct_loss"]]
                    for k, b in bases.items()
                ],
            ),
        ),
        (
            "Headline: picked learning rate, mean (sd) over seeds",
            markdown_table(["method", "lr", "seeds", "GSM8K EM", "learning", "sd", "forgetting", "sd"], head_rows),
        ),
        (
            "Headline losses: picked learning rate, mean (sd) over seeds (nats per token)",
            markdown_table(
                ["method", "lr", "seeds", "GSM8K val loss", "sd", "GSM8K test loss change", "sd"]
                + ["self-instruct loss change", "sd"],
                head_loss_rows,
            ),
        ),
        (
            "Sweep (learning rate picked on validation loss)",
            markdown_table(
                [
                    "method",
                    "lr",
                    "seed",
                    "val loss",
                    short[tgt],
                    short[srcs[0]],
                    short[srcs[1]],
                    "learning",
                    "forgetting",
                    "picked",
                ],
                sweep_rows,
            ),
        ),
        (
            "Held-out losses: GSM8K test solutions and self-instruct references (nats per token; never "
            "averaged with accuracies)",
            markdown_table(
                ["method", "lr", "seed", "GSM8K test: base", "run", "change", "self-instruct: base", "run", "change"],
                loss_rows,
            ),
        ),
        (
            "Spectrum of dW at the picked rate: rank for 90% of the energy, and ||dW|| / ||W0||",
            markdown_table(
                ["method", "layer type", "rank90 mean", "rank90 max", "full rank", "relative size"], spec_rows
            ),
        ),
    ]
    notes = [
        f"Items: GSM8K test {n[tgt]}, MMLU {n[srcs[0]]} ({MMLU_SUBJECTS}), BBH {n[srcs[1]]} ({BBH_TASKS}); "
        f"{sizes['train']} GSM8K train examples, {steps} steps of batch {sizes['batch']}; validation "
        f"{sizes['val']} GSM8K train examples. learning = GSM8K EM gain over the base; forgetting = mean "
        "drop of MMLU and BBH accuracy (fractions: 0.01 = one point). One item of n moves a score by 1/n."
    ]
    if len(bases) > 1:
        notes.append(
            "bf16: each run is measured against the model it started from, scored the same way (bf16 autocast): "
            "adapter runs against the base with bf16 weights, full finetuning against the fp32 weights."
        )
    ctx.finish(
        {
            "base": base,
            "base_full_finetuning": bases.get("full"),
            "precision": precision,
            "runs": rows,
            "picked_lr": picked,
            "sizes": sizes,
            "steps": steps,
            "mmlu_subjects": MMLU_SUBJECTS,
            "bbh_tasks": BBH_TASKS,
        },
        tables,
        plots=["learn_forget.png", "learn_forget_loss.png", "spectrum.png"],
        notes=notes,
    )
