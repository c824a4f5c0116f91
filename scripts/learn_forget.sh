#!/usr/bin/env bash
# Learn versus forget on the default model: several finetunes of the demo task (registry lines,
# generated, so nothing is downloaded), then `deltatune forgetting` against the base on the task
# (target) and on general sources (GSM8K answer loss, MMLU option likelihood).
# Usage: scripts/learn_forget.sh [OUT=runs/learn_forget]   (about 25 minutes on 2 CPU cores)
set -euo pipefail
OUT=${1:-runs/learn_forget}
DATA=${DELTATUNE_DATA:-../shared/data}
mkdir -p "$OUT"
python - "$OUT" <<'PY'
import json, sys
from deltatune.demo import make_records
out = sys.argv[1]
rows = make_records(648, seed=7)
with open(f"{out}/train.jsonl", "w") as f:
    f.writelines(json.dumps(r) + "\n" for r in rows[:600])
with open(f"{out}/heldout.jsonl", "w") as f:
    f.writelines(json.dumps(r) + "\n" for r in rows[600:])
PY
# GSM8K test answers as a general source, in the instruction/output fields the loss task reads
python - "$DATA/gsm8k/test.jsonl" "$OUT/gsm8k_source.jsonl" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1], encoding="utf-8").read().splitlines()[:60]]
with open(sys.argv[2], "w") as f:
    f.writelines(json.dumps({"instruction": r["question"], "output": r["answer"]}) + "\n" for r in rows)
PY
common=(--data "$OUT/train.jsonl" --template chatml --policy response --epochs 1 --batch-size 8 --seq-len 256
        --set eval_fraction=0 --quiet)
deltatune train "${common[@]}" --method lora --rank 8 --alpha 16 --lr 1e-3 --output "$OUT/lora-r8"
deltatune train "${common[@]}" --method lora --rank 64 --alpha 128 --lr 5e-4 --output "$OUT/lora-r64"
deltatune train "${common[@]}" --method dora --rank 8 --alpha 16 --lr 1e-3 --output "$OUT/dora-r8"
deltatune train "${common[@]}" --method full --lr 5e-5 --output "$OUT/full"
deltatune forgetting --run "$OUT/lora-r8" --run "$OUT/lora-r64" --run "$OUT/dora-r8" --run "$OUT/full" \
    --target "file:$OUT/heldout.jsonl" --source "loss:$OUT/gsm8k_source.jsonl,mmlu:high_school_geography" \
    --limit 60 --max-new-tokens 40 --batch-size 16 --out "$OUT/report"
