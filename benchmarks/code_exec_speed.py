"""Speed of scoring code samples: N HumanEval-sized problems, one sample each, through `eval --score`'s path.

The problems are hand-made and HumanEval-sized (a docstring'd signature of ~10 lines, a check()
with 8 asserts, a correct 4-line completion, half of them with a wrong one instead so failures
are timed too). Each sample runs in its own limited process (see deltatune/evaluate/execution.py).
The issue's bar: 164 problems, one sample each, under 60 s on 2 cores.
Writes benchmarks/results/code_exec_speed.json.
Usage: python benchmarks/code_exec_speed.py [--problems 164] [--workers 2]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def make_problem(i: int) -> tuple[dict, str]:
    """A HumanEval-format record and a completion (right for even i, wrong for odd i)."""
    name = f"scaled_sum_{i}"
    prompt = (
        f"from typing import List\n\n\ndef {name}(numbers: List[int], factor: int) -> int:\n"
        f'    """Return the sum of the numbers that are not divisible by {i % 7 + 2},\n'
        "    each multiplied by factor.\n"
        f"    >>> {name}([1, 2, 3], 2)\n"
        f"    {2 * sum(x for x in [1, 2, 3] if x % (i % 7 + 2))}\n"
        f"    >>> {name}([], 5)\n    0\n"
        '    """\n'
    )
    d = i % 7 + 2
    cases = [
        ([1, 2, 3], 2),
        ([], 5),
        ([10, 11, 12, 13], 1),
        ([d, 2 * d], 3),
        (list(range(20)), 4),
        ([-1, -2, -3], 2),
        ([7] * 5, 1),
        ([100, 101], 0),
    ]
    asserts = "".join(f"    assert candidate({xs!r}, {f}) == {f * sum(x for x in xs if x % d)}\n" for xs, f in cases)
    test = f"METADATA = {{'author': 'bench'}}\n\n\ndef check(candidate):\n{asserts}"
    right = f"    total = 0\n    for x in numbers:\n        if x % {d}:\n            total += x * factor\n    return total\n"
    wrong = "    return sum(numbers) * factor\n"
    return {"task_id": f"Bench/{i}", "prompt": prompt, "test": test, "entry_point": name}, (
        right if i % 2 == 0 else wrong
    )


def main() -> int:
    from deltatune.evaluate.execution import Limits, isolation
    from deltatune.evaluate.runner import EvalOptions
    from deltatune.evaluate.scoring import score_predictions
    from deltatune.evaluate.tasks import resolve_task

    ap = argparse.ArgumentParser()
    ap.add_argument("--problems", type=int, default=164)
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tasks, preds = Path(tmp) / "bench_humaneval.jsonl", Path(tmp) / "samples.jsonl"
        pairs = [make_problem(i) for i in range(args.problems)]
        tasks.write_text("".join(json.dumps(p) + "\n" for p, _ in pairs))
        preds.write_text("".join(json.dumps({"task_id": p["task_id"], "completion": c}) + "\n" for p, c in pairs))
        opts = EvalOptions(
            progress=False, allow_code_execution=True, exec_workers=args.workers, exec_timeout=Limits().timeout_s
        )
        t0 = time.perf_counter()
        result = score_predictions(preds, [resolve_task(f"code:{tasks}")], opts)[0]
        seconds = time.perf_counter() - t0
    expected = sum(1 for i in range(args.problems) if i % 2 == 0) / args.problems
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    cpu = (
        next(
            (
                ln.split(":", 1)[1].strip()
                for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")
            ),
            platform.processor(),
        )
        if Path("/proc/cpuinfo").exists()
        else ""
    )
    flags = (
        next(
            (
                ln.split(":", 1)[1].split()
                for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("flags")
            ),
            [],
        )
        if Path("/proc/cpuinfo").exists()
        else []
    )
    row = {
        "problems": args.problems,
        "workers": args.workers,
        "seconds": round(seconds, 2),
        "samples_per_s": round(args.problems / seconds, 1),
        "pass@1": result.score,
        "pass@1_expected": expected,
        "under_60s": seconds < 60,
    }
    print("| problems | workers | seconds | samples/s | pass@1 (expected) | under 60 s |")
    print("|---|---|---|---|---|---|")
    print(
        f"| {row['problems']} | {row['workers']} | {row['seconds']} | {row['samples_per_s']} | "
        f"{row['pass@1']:.3f} ({expected:.3f}) | {row['under_60s']} |"
    )
    print(f"cpu: {cpu}, {os.cpu_count()} cores, load average {load}; isolation: {isolation()}")
    out = ROOT / "benchmarks" / "results" / "code_exec_speed.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps(
            {
                **row,
                "cpu": cpu,
                "cores": os.cpu_count(),
                "load_average_1min": load,
                "cpu_flags": [f for f in flags if f.startswith(("avx", "sse4", "amx"))],
                "isolation": isolation(),
                "python": sys.version.split()[0],
            },
            indent=2,
        )
        + "\n"
    )
    if abs(result.score - expected) > 1e-9:
        print("error: pass@1 differs from the known right/wrong split")
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
