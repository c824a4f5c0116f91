"""Agreement of `deltatune eval` with lm-evaluation-harness on the same items (not run in CI).

Both tools score the same model object (the default model, then the same model with a LoRA
adapter) on the same items: MMLU questions (option log-likelihood; deltatune's `acc` is
lm-eval's `acc_norm`, its `acc_sum` lm-eval's `acc`) and GSM8K test problems (greedy, 0 shots,
strict `#### N` match and the flexible last-number match). The items are written as local JSONL
files with lm-eval task YAMLs beside them (`--work`), prompts in deltatune's plain style
("Question: ...\\nAnswer:"), so any difference comes from the tools, not the prompts. Prints a
table (score per tool, difference in points, items on which the two disagree) and writes
benchmarks/results/lm_eval_agreement.json.

Full run (the lead, on a quiet machine; see docs/evaluation.md):
  python benchmarks/lm_eval_agreement.py --mmlu-per-subject 50 --gsm8k 100
Quick check (a handful of items): python benchmarks/lm_eval_agreement.py --mmlu-per-subject 2 --gsm8k 2 \\
  --max-new-tokens 32 --subjects anatomy
Without --adapter a LoRA r=8 adapter with small random B (seeded) is made, so the adapter path is
exercised even without a trained one; pass --adapter runs/X/final for a real one.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks.machine import command_line, cpu_info  # noqa: E402

for _var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "HF_EVALUATE_OFFLINE", "TRANSFORMERS_OFFLINE"):
    os.environ.setdefault(_var, "1")  # local files only: never wait on the Hub

SUBJECTS = "high_school_geography+anatomy+astronomy+college_biology"
STRICT = r"#### (\-?[0-9\.\,]+)"
FLEXIBLE = r"(-?[$0-9.,]{2,})|(-?[0-9]+)"


def write_tasks(work: Path, mmlu_items, gsm_items, max_new_tokens: int) -> list[str]:
    """JSONL data and lm-eval task YAMLs for exactly these items; returns the task names."""
    from deltatune.evaluate.tasks import GSM8K_ZERO_SHOT

    work.mkdir(parents=True, exist_ok=True)
    (work / "mmlu.jsonl").write_text(
        "".join(
            json.dumps({"question": it.prompt, "choices": it.options, "answer": it.answer}) + "\n" for it in mmlu_items
        )
    )
    (work / "gsm8k.jsonl").write_text(
        "".join(json.dumps({"question": it.prompt, "target": it.target}) + "\n" for it in gsm_items)
    )
    mmlu = {
        "task": "deltatune_mmlu",
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(work / "mmlu.jsonl")}},
        "test_split": "test",
        "output_type": "multiple_choice",
        "doc_to_text": "Question: {{question}}\nAnswer:",
        "doc_to_choice": "choices",
        "doc_to_target": "answer",
        "target_delimiter": " ",
        "metric_list": [
            {"metric": "acc", "aggregation": "mean", "higher_is_better": True},
            {"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True},
        ],
    }
    gsm = {
        "task": "deltatune_gsm8k",
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(work / "gsm8k.jsonl")}},
        "test_split": "test",
        "output_type": "generate_until",
        "doc_to_text": "Question: {{question}}" + GSM8K_ZERO_SHOT + "\nAnswer:",
        "doc_to_target": "target",
        "target_delimiter": " ",
        "generation_kwargs": {
            "until": ["\nQuestion:", "<|im_end|>"],
            "do_sample": False,
            "max_gen_toks": max_new_tokens,
        },
        "metric_list": [
            {
                "metric": "exact_match",
                "aggregation": "mean",
                "higher_is_better": True,
                "ignore_case": True,
                "ignore_punctuation": False,
                "regexes_to_ignore": [",", "\\$", "\\.$"],
            }
        ],
        "filter_list": [
            {
                "name": "strict-match",
                "filter": [{"function": "regex", "regex_pattern": STRICT}, {"function": "take_first"}],
            },
            {
                "name": "flexible-extract",
                "filter": [
                    {"function": "regex", "group_select": -1, "regex_pattern": FLEXIBLE},
                    {"function": "take_first"},
                ],
            },
        ],
    }
    names = []
    for cfg, items in ((mmlu, mmlu_items), (gsm, gsm_items)):
        if items:
            (work / f"{cfg['task']}.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
            names.append(cfg["task"])
    return names


def run_lm_eval(model, tokenizer, work: Path, tasks: list[str], batch_size: int) -> tuple[dict, dict]:
    """lm-eval's aggregate metrics and its per-item records, per task."""
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device="cpu")
    out = simple_evaluate(
        model=lm,
        tasks=tasks,
        task_manager=TaskManager(include_path=str(work)),
        num_fewshot=0,
        log_samples=True,
        bootstrap_iters=0,
        random_seed=0,
    )
    return out["results"], out.get("samples", {})


def per_item_lm_eval(samples: list[dict], key: str, filt: str | None = None) -> dict[int, float]:
    rows = [s for s in samples if filt is None or s.get("filter") == filt]
    return {int(s["doc_id"]): float(s[key]) for s in rows if key in s}


def raw_checks(raw: dict, samples: dict) -> dict:
    """Below the scores: the largest option log-likelihood difference (nats) and how many generations match."""
    out: dict = {}
    mm = {int(s["doc_id"]): s for s in samples.get("deltatune_mmlu", [])}
    diffs = []
    for i, p in enumerate(raw.get("mmlu", [])):
        if i in mm:
            theirs = [float(r[0][0] if isinstance(r[0], (list, tuple)) else r[0]) for r in mm[i]["resps"]]
            diffs += [abs(a - b) for a, b in zip(p["logprobs"], theirs)]
    if diffs:
        out["mmlu_loglik_max_abs_diff"] = round(max(diffs), 5)  # ours are rounded to 4 decimals
    gs = {}
    for s in samples.get("deltatune_gsm8k", []):
        gs.setdefault(int(s["doc_id"]), s["resps"][0][0] if isinstance(s["resps"][0], list) else s["resps"][0])
    same = [p["output"].strip() == gs[i].strip() for i, p in enumerate(raw.get("gsm8k", [])) if i in gs]
    if same:
        out["gsm8k_outputs_identical"] = f"{sum(same)}/{len(same)}"
    return out


def compare(label: str, ours: dict, theirs: dict, ours_items: dict, theirs_items: dict) -> list[dict]:
    rows = []
    for name, (our_value, their_key) in ours.items():
        their_value = theirs.get(their_key)
        a, b = ours_items.get(name, {}), theirs_items.get(name, {})
        disagree = sum(1 for i in a if i in b and a[i] != b[i])
        rows.append(
            {
                "model": label,
                "metric": name,
                "deltatune": our_value,
                "lm_eval": their_value,
                "diff_points": None if their_value is None else round(100 * (our_value - their_value), 2),
                "items": len(a),
                "items_disagreeing": disagree,
            }
        )
    return rows


def main() -> int:
    from deltatune.evaluate.runner import EvalOptions, evaluate_task
    from deltatune.evaluate.tasks import load_items, resolve_task
    from deltatune.models import load_model

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None)
    ap.add_argument("--adapter", default=None, help="LoRA adapter folder (default: a seeded random one)")
    ap.add_argument("--subjects", default=SUBJECTS, help="MMLU subjects joined by +")
    ap.add_argument("--mmlu-per-subject", type=int, default=50)
    ap.add_argument("--gsm8k", type=int, default=100, help="first N GSM8K test problems")
    ap.add_argument("--max-new-tokens", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    ap.add_argument("--work", default=None, help="folder for the task files (default: a temporary one)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "lm_eval_agreement.json"))
    args = ap.parse_args()
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        print("lm_eval_agreement: lm-eval is not installed (pip install -e '.[dev]')")
        return 1

    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    mmlu_task, gsm_task = resolve_task(f"mmlu:{args.subjects}"), resolve_task("gsm8k")
    mmlu_items = load_items(mmlu_task, args.mmlu_per_subject) if args.mmlu_per_subject else []
    gsm_items = load_items(gsm_task, args.gsm8k) if args.gsm8k else []
    base, tok = load_model(args.model, dtype="fp32")
    adapter_dir = args.adapter
    tmp = tempfile.TemporaryDirectory()
    if adapter_dir is None:
        adapter_dir = make_random_lora(base, Path(tmp.name) / "lora-r8")
    work = Path(args.work) if args.work else Path(tmp.name) / "tasks"
    names = write_tasks(work, mmlu_items, gsm_items, args.max_new_tokens)
    opts = EvalOptions(style="plain", batch_size=args.batch_size, max_new_tokens=args.max_new_tokens, progress=False)

    table, timings, checks = [], {}, {}
    for label in ("base", "lora"):
        if label == "base":
            model = base
        else:
            import copy

            from deltatune.methods.apply import load_adapter

            model = load_adapter(copy.deepcopy(base), adapter_dir).model
        model.eval()
        t0 = time.perf_counter()
        ours, ours_items, raw = {}, {}, {}
        if mmlu_items:
            r = evaluate_task(model, tok, mmlu_task, opts, mmlu_items)
            raw["mmlu"] = r.predictions
            ours["mmlu acc (char-normalised)"] = (r.metrics["acc"], ("deltatune_mmlu", "acc_norm,none"))
            ours["mmlu acc_sum"] = (r.metrics["acc_sum"], ("deltatune_mmlu", "acc,none"))
            ours_items["mmlu acc (char-normalised)"] = {
                i: float(p["predicted"] == p["target"]) for i, p in enumerate(r.predictions)
            }
            ours_items["mmlu acc_sum"] = {
                i: float(max(range(len(p["logprobs"])), key=p["logprobs"].__getitem__) == "ABCD".index(p["target"]))
                for i, p in enumerate(r.predictions)
            }
        if gsm_items:
            r = evaluate_task(model, tok, gsm_task, opts, gsm_items)
            raw["gsm8k"] = r.predictions
            ours["gsm8k exact_match (strict)"] = (
                r.metrics["exact_match"],
                ("deltatune_gsm8k", "exact_match,strict-match"),
            )
            ours["gsm8k exact_match (flexible)"] = (
                r.metrics["exact_match_flexible"],
                ("deltatune_gsm8k", "exact_match,flexible-extract"),
            )
            ours_items["gsm8k exact_match (strict)"] = {i: p["exact_match"] for i, p in enumerate(r.predictions)}
            ours_items["gsm8k exact_match (flexible)"] = {
                i: p["exact_match_flexible"] for i, p in enumerate(r.predictions)
            }
        t1 = time.perf_counter()
        results, samples = run_lm_eval(model, tok, work, names, args.batch_size)
        t2 = time.perf_counter()
        timings[label] = {"deltatune_s": round(t1 - t0, 1), "lm_eval_s": round(t2 - t1, 1)}
        theirs = {name: results.get(task, {}).get(key) for name, (_, (task, key)) in ours.items()}
        theirs_items = {}
        for name, (_, (task, key)) in ours.items():
            metric, _, filt = key.partition(",")
            theirs_items[name] = per_item_lm_eval(samples.get(task, []), metric, None if filt == "none" else filt)
        table += compare(label, {k: (v, k) for k, (v, _) in ours.items()}, theirs, ours_items, theirs_items)
        checks[label] = raw_checks(raw, samples)

    cols = ["model", "metric", "items", "deltatune", "lm_eval", "diff_points", "items_disagreeing"]
    print("| " + " | ".join(cols) + " |\n|" + "---|" * len(cols))
    for row in table:
        print("| " + " | ".join(f"{row[c]:.4f}" if isinstance(row[c], float) else str(row[c]) for c in cols) + " |")
    for label, c in checks.items():
        print(f"{label}: " + ", ".join(f"{k} {v}" for k, v in c.items()))
    import torch

    payload = {
        "checks": checks,
        "model": args.model or "default",
        "adapter": args.adapter or "random LoRA r=8 (seeded)",
        "subjects": args.subjects,
        "mmlu_per_subject": args.mmlu_per_subject,
        "gsm8k": args.gsm8k,
        "max_new_tokens": args.max_new_tokens,
        "lm_eval_version": _version("lm_eval"),
        "command": command_line(),
        "machine": cpu_info(),
        "threads": torch.get_num_threads(),
        "load_average_1min": os.getloadavg()[0],
        "timings": timings,
        "rows": table,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(payload, indent=2) + "\n")
    print(f"wrote {args.out}; timings {timings}")
    tmp.cleanup()
    return 0


def make_random_lora(base, path: Path) -> str:
    """A LoRA r=8 (alpha 16, all linear layers) adapter with B ~ N(0, 0.002^2), seeded: a visible change."""
    import copy

    import torch

    from deltatune.methods import MethodSpec
    from deltatune.methods.apply import apply_methods

    adapted = apply_methods(copy.deepcopy(base), MethodSpec("lora", targets="all-linear", rank=8, alpha=16.0))
    torch.manual_seed(0)
    for m in adapted.model.modules():
        if hasattr(m, "lora_B"):
            torch.nn.init.normal_(m.lora_B.weight, std=0.002)
    adapted.save_adapter(path)
    return str(path)


def _version(name: str) -> str:
    from importlib.metadata import version

    return version(name)


if __name__ == "__main__":
    raise SystemExit(main())
