# GPU check of the distributed path (docs/distributed.md): plain single-process CUDA runs vs torchrun
# (NCCL) and `deltatune train --nproc`, LoRA (DDP) and full finetuning (FSDP2); prints max |diff| of the
# checkpoints (0.0 on one H200 with one process). With several GPUs: NPROC=2 bash benchmarks/distributed_gpu_check.sh.
set -x
[ -d .whl ] && { python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1; }  # missing packages carried as wheels
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 OMP_NUM_THREADS=1
python3 -c "import torch, transformers; print(torch.__version__, transformers.__version__, torch.cuda.get_device_name())"
python3 - <<'PY'
import json
from deltatune.testing import tiny_model, tiny_tokenizer
tiny_model().save_pretrained("/tmp/tiny"); tiny_tokenizer().save_pretrained("/tmp/tiny")
rows = [{"instruction": f"What is {a} + {b}?", "output": f"The answer is {a + b}."} for a in range(6) for b in range(6)]
open("/tmp/train.jsonl", "w").write("\n".join(json.dumps(r) for r in rows) + "\n")
PY
C="--model /tmp/tiny --data /tmp/train.jsonl --rank 4 --alpha 8 --seq-len 64 --precision fp32 --steps 3 --grad-accum 2 --seed 3 --set eval_fraction=0.1 --set warmup_steps=0 --set schedule=constant --save-every 3 --eval-every 2 --device cuda --quiet"
N=${NPROC:-1}; B=$((4 / N))  # global batch 4 rows either way
for m in lora full; do
  timeout 120 python3 -m deltatune train $C --method $m --lr 1e-3 --batch-size 4 --output /tmp/one-$m; echo "single $m rc=$?"
  timeout 150 python3 -m torch.distributed.run --standalone --nproc_per_node $N -m deltatune train $C --method $m --lr 1e-3 --batch-size $B --output /tmp/tr-$m; echo "torchrun $m rc=$?"
  timeout 150 python3 -m deltatune train $C --method $m --lr 1e-3 --batch-size $B --output /tmp/tr2-$m --nproc $N; echo "--nproc $m rc=$?"
done
python3 - <<'PY'
import glob, json, torch
from safetensors.torch import load_file
for m in ("lora", "full"):
    a = load_file(glob.glob(f"/tmp/one-{m}/checkpoints/*/trainable.safetensors")[0])
    for other in (f"/tmp/tr-{m}", f"/tmp/tr2-{m}"):
        try:
            b = load_file(glob.glob(f"{other}/checkpoints/*/trainable.safetensors")[0])
            print(m, other, "max|diff|", max((a[k] - b[k]).abs().max().item() for k in a), "meta", json.load(open(glob.glob(f"{other}/checkpoints/*/meta.json")[0]))["world_size"])
        except Exception as e:
            print(m, other, "ERROR", e)
    print(open(f"/tmp/one-{m}/metrics.jsonl").read()[:400]); print(open(f"/tmp/tr-{m}/metrics.jsonl").read()[:400])
PY
