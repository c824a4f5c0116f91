"""Is this change faster? `train_speed.py`'s contenders on an earlier commit's deltatune against the working tree's.

A change to a hot path (span attention, the loss head) has no setting to switch it off, so the way to measure it
is the code before against the code after, on the same machine in the same hour. The earlier commit is checked
out into a temporary git worktree (removed at the end) and put first on each child's `PYTHONPATH`, so that its
`deltatune` package is the one imported; the benchmark scripts, data and model are the working tree's for both.
Each run is the contender in its own process, the two interleaved (`pairs.py`); the table gives tokens/s, the
ratio of each pair (working tree over BASE) and peak RSS.

    python benchmarks/commits.py --base HEAD [--contenders deltatune-compiled,deltatune] [--repeats 4]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import command_line, describe, machine_record  # noqa: E402
from pairs import benchmark_context, print_pairs, run_pairs  # noqa: E402

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


def git(*args: str) -> str:
    return subprocess.run(["git", *args], cwd=ROOT, check=True, capture_output=True, text=True).stdout.strip()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", default="HEAD", help="the commit to compare against (default: HEAD)")
    parser.add_argument("--contenders", default="deltatune-compiled", help="train_speed.py contender names")
    parser.add_argument("--repeats", type=int, default=4)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--out", type=Path, default=HERE / "results" / "commits.json")
    args = parser.parse_args()
    try:
        base = git("rev-parse", "--verify", f"{args.base}^{{commit}}")
    except subprocess.CalledProcessError:
        parser.error(f"--base: '{args.base}' is no commit of this repository")
    changed = git("status", "--porcelain", "--untracked-files=no", "--", "deltatune")
    machine = machine_record()
    print(describe(machine))
    print(
        f"base {base[:10]} against the working tree ({'uncommitted changes' if changed else git('rev-parse', 'HEAD')[:10]})"
    )
    ctx, tokens = benchmark_context(args.steps, args.warmup)
    with tempfile.TemporaryDirectory(prefix="deltatune-base-") as tmp:
        tree = Path(tmp) / "tree"
        git("worktree", "add", "--detach", "--quiet", str(tree), base)
        try:
            imported = subprocess.run(
                [sys.executable, "-c", "import deltatune; print(deltatune.__file__)"],
                env={**os.environ, "PYTHONPATH": str(tree)},
                capture_output=True,
                text=True,
                cwd=HERE,
            ).stdout.strip()
            if not imported.startswith(str(tree)):  # measured the working tree twice
                sys.exit(f"the base's children would import deltatune from {imported or '?'}, not {tree}")
            variants = {"base": (ctx, {"PYTHONPATH": str(tree)}), "working tree": (ctx, None)}
            rows = run_pairs(args.contenders.split(","), variants, args.repeats, tokens)
        finally:
            git("worktree", "remove", "--force", str(tree))
    print_pairs(rows)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    record = {
        "command": command_line(),
        "machine": machine,
        "base": base,
        "working_tree": git("rev-parse", "HEAD"),
        "uncommitted_changes": bool(changed),
        "tokens": tokens,
        "rows": rows,
    }
    args.out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
