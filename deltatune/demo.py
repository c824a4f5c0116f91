"""The default demo: teach the default model a task it cannot do before training, and show it.

The task is generated here, so nothing is downloaded: turn a sentence about a fictional person
into a registry line `SURNAME|Given|YYYY-MM-DD|CITY|occupation`. The base model does not know
this format; after a short LoRA finetune it produces it for people it has never seen. Before and
after, we report held-out loss and exact match on held-out sentences, and the loss on a general
source set (GSM8K answers, when ../shared/data is present) to show how much the model forgot.
"""

from __future__ import annotations

import hashlib
import json
import random
import time
from pathlib import Path

TEMPLATE = "auto"  # the model's own chat template where it has one: what generate, eval and serve render
DEMO_MARKER = "demo.json"

MONTHS = [
    "January",
    "February",
    "March",
    "April",
    "May",
    "June",
    "July",
    "August",
    "September",
    "October",
    "November",
    "December",
]
CITIES = [
    "Oslo",
    "Lima",
    "Porto",
    "Quito",
    "Riga",
    "Turin",
    "Dakar",
    "Hanoi",
    "Perth",
    "Basel",
    "Cork",
    "Split",
    "Kyoto",
    "Tunis",
    "Leeds",
    "Malmo",
    "Graz",
    "Bergen",
    "Nantes",
    "Osaka",
]
JOBS = [
    "baker",
    "pilot",
    "nurse",
    "farmer",
    "teacher",
    "welder",
    "chemist",
    "tailor",
    "plumber",
    "painter",
    "sailor",
    "judge",
    "florist",
    "miner",
    "librarian",
    "carpenter",
]
SYLLABLES = [
    "ka",
    "lo",
    "mi",
    "ra",
    "ven",
    "tor",
    "sel",
    "bri",
    "dun",
    "fa",
    "gor",
    "hil",
    "jas",
    "kel",
    "mor",
    "nis",
    "pra",
    "quo",
    "ril",
    "sta",
    "tev",
    "ul",
    "vak",
    "wen",
    "yor",
    "zel",
]
PHRASINGS = [
    "{given} {surname} was born on {day} {month} {year} in {city} and works as a {job}.",
    "Born in {city} on {month} {day}, {year}, {given} {surname} is a {job}.",
    "{surname}, {given}: a {job} from {city}, born {day} {month} {year}.",
    "The {job} {given} {surname} came into the world in {city} on {day} {month} {year}.",
]
INSTRUCTION = "Convert this sentence into a registry line."


def _name(rng: random.Random) -> str:
    return "".join(rng.choice(SYLLABLES) for _ in range(rng.randint(2, 3))).capitalize()


def make_records(n: int, seed: int) -> list[dict]:
    """`n` Alpaca-style records (instruction, input, output) about distinct fictional people."""
    rng = random.Random(seed)
    records, seen = [], set()
    while len(records) < n:
        given, surname = _name(rng), _name(rng)
        if (given, surname) in seen:
            continue
        seen.add((given, surname))
        year, month, day = rng.randint(1940, 2005), rng.randint(1, 12), rng.randint(1, 28)
        city, job = rng.choice(CITIES), rng.choice(JOBS)
        sentence = rng.choice(PHRASINGS).format(
            given=given, surname=surname, day=day, month=MONTHS[month - 1], year=year, city=city, job=job
        )
        answer = f"{surname.upper()}|{given}|{year:04d}-{month:02d}-{day:02d}|{city.upper()}|{job}"
        records.append({"instruction": INSTRUCTION, "input": sentence, "output": answer})
    return records


def source_records(limit: int = 48) -> tuple[str, list[dict]]:
    """A general set to measure forgetting: GSM8K test answers if ../shared/data is here."""

    from deltatune.evaluate.tasks import data_root

    try:
        path = data_root() / "gsm8k" / "test.jsonl"
    except Exception:
        return "", []
    if not path.exists():
        return "", []
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()[:limit]]
    return str(path), [{"instruction": r["question"], "output": r["answer"]} for r in rows]


def _prompts(tokenizer, records: list[dict]) -> list[str]:
    """Each held-out record's prompt exactly as training renders it (the same template, up to the answer): the
    model's own chat template rendered by `apply_chat_template` added SmolLM2's default system prompt, which the
    demo's chatml training had never shown, and failed on a tokenizer without a template."""
    from deltatune.experiments.common import generation_prompts

    return generation_prompts(records, tokenizer, TEMPLATE)


def measure(model, tokenizer, task_eval: list[dict], source: list[dict]) -> dict:
    from deltatune.data.masking import LossPolicy, policy_weights
    from deltatune.data.pipeline import prepare_records
    from deltatune.evaluate.generate import GenerationConfig, generate
    from deltatune.evaluate.loss import heldout_loss

    def loss_on(records: list[dict]) -> float | None:
        if not records:
            return None
        examples = prepare_records(records, tokenizer, template=TEMPLATE, max_len=512).examples
        for ex in examples:
            ex.weights = policy_weights(ex, LossPolicy("response"))
        return heldout_loss(model, examples, batch_size=16, pad_id=tokenizer.pad_token_id, progress=False).loss

    answers = generate(
        model,
        tokenizer,
        _prompts(tokenizer, task_eval),
        GenerationConfig(max_new_tokens=40),
        batch_size=32,
        progress=False,
    )
    exact = sum(a.strip() == r["output"] for a, r in zip(answers, task_eval)) / len(task_eval)
    return {
        "task_loss": loss_on(task_eval),
        "exact_match": exact,
        "source_loss": loss_on(source),
        "sample": answers[0].strip(),
    }


def _is_demo_run(out: Path) -> bool:
    """Whether `out` holds the run an earlier demo wrote (its marker names the config.yaml it wrote): only that one
    is replaced without --overwrite (the demo replaced any deltatune run there, a user's included)."""
    marker, config = out / DEMO_MARKER, out / "config.yaml"
    try:
        recorded = json.loads(marker.read_text(encoding="utf-8")).get("config_sha256")
        return recorded == hashlib.sha256(config.read_bytes()).hexdigest()
    except (OSError, ValueError, AttributeError):
        return False


def _mark_demo_run(out: Path) -> None:
    digest = hashlib.sha256((out / "config.yaml").read_bytes()).hexdigest()
    (out / DEMO_MARKER).write_text(json.dumps({"config_sha256": digest}) + "\n", encoding="utf-8")


def run_demo(
    output: str = "runs/demo",
    n_train: int = 800,
    n_eval: int = 64,
    steps: int | None = None,
    model_name: str | None = None,
    seed: int = 0,
    overwrite: bool = False,
) -> dict:
    from deltatune.config import TrainConfig
    from deltatune.errors import ConfigError, UserError
    from deltatune.models import load_model, local_model_path
    from deltatune.train.loop import train
    from deltatune.train.run_folder import check_output_folder

    if n_train < 1:
        raise UserError(f"must be at least 1, got {n_train}", field="train-examples")
    if steps is not None and steps < 1:
        raise UserError(f"must be at least 1, got {steps}", field="steps")
    cfg = TrainConfig(
        model=model_name,
        template=TEMPLATE,
        policy="response",
        method="lora",
        rank=16,
        alpha=32,
        lr=1e-3,
        epochs=2,
        steps=steps,
        batch_size=8,
        seq_len=256,
        output=output,
        seed=seed,
        eval_fraction=0.0,
        log_every=10,
        warmup_ratio=0.05,
        resume=False,
        overwrite=overwrite or _is_demo_run(Path(output).expanduser()),
    )  # the demo starts fresh: replaces its own earlier run, another run only with --overwrite
    # checked before the minutes of the "before" measurement, not after them
    try:
        check_output_folder(cfg, reads={"model": str(local_model_path(model_name) or "") or None})
    except ConfigError as exc:
        if cfg.overwrite or "already holds a run" not in str(exc):
            raise
        raise ConfigError(
            f"{output} already holds a run the demo did not write (or one it did not finish); pass --overwrite to "
            "replace it, or choose another --output",
            field="output",
        ) from None
    train_records = make_records(n_train + n_eval, seed)
    task_train, task_eval = train_records[:n_train], train_records[n_train:]
    source_path, source = source_records()
    print(
        f"demo: teach '{INSTRUCTION}' to the default model; {n_train} generated training examples, "
        f"{n_eval} held-out people"
    )
    print(f"  example: {task_eval[0]['input']}\n  target : {task_eval[0]['output']}")
    model, tokenizer = load_model(model_name)
    t0 = time.perf_counter()
    before = measure(model, tokenizer, task_eval, source)
    del model
    result = train(cfg, records=task_train, eval_records=task_eval[:16])
    _mark_demo_run(Path(output).expanduser())
    tuned, tokenizer = load_model(model_name, adapter=Path(output) / "final")
    after = measure(tuned, tokenizer, task_eval, source)
    rows = [
        ("held-out task loss (response tokens)", before["task_loss"], after["task_loss"]),
        ("held-out exact match", before["exact_match"], after["exact_match"]),
    ]
    if source:
        rows.append(("source loss, GSM8K answers (forgetting)", before["source_loss"], after["source_loss"]))
    print(f"\n{'':44s}{'before':>10s}{'after':>10s}")
    for name, b, a in rows:
        fmt = (lambda v: f"{100 * v:9.1f}%") if "exact" in name else (lambda v: f"{v:10.3f}")
        print(f"{name:44s}{fmt(b)}{fmt(a)}")
    if source:
        change = after["source_loss"] - before["source_loss"]
        print(
            f"forgetting: source loss changed by {change:+.3f} nats/token ({100 * change / before['source_loss']:+.1f}%)"
        )
    else:
        print("forgetting: skipped (no ../shared/data/gsm8k beside the checkout)")
    print(f"sample before: {before['sample']!r}\nsample after : {after['sample']!r}")
    print(
        f"training: {result.steps} steps, {result.real_tokens} real tokens, {result.tokens_per_s:.0f} tokens/s; "
        f"total {time.perf_counter() - t0:.0f}s; adapter in {Path(output) / 'final'}"
    )
    return {"before": before, "after": after, "train_tokens_per_s": result.tokens_per_s}
