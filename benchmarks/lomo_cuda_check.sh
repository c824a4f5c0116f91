#!/bin/sh
# Device check for the fused update: CUDA equality with torch SGD/AdamW, then the memory table on CUDA.
set -e
export PYTHONPATH=. PYTHONUNBUFFERED=1
python3 - <<'PY'
import copy, torch
from deltatune.testing import tiny_model
from deltatune.train.lomo import FusedUpdate
ids = torch.randint(3, 512, (2, 32), device="cuda")
for algo, ref_cls in (("sgd", torch.optim.SGD), ("adamw", torch.optim.AdamW)):
    a = tiny_model(0).cuda().train(); b = copy.deepcopy(a)
    kw = {"foreach": False} if algo == "adamw" else {}
    ref = ref_cls(b.parameters(), lr=1e-2, weight_decay=0.1, **kw)
    fused = FusedUpdate(a.parameters(), lr=1e-2, weight_decay=0.1, algorithm=algo)
    for _ in range(3):
        b(ids, labels=ids).loss.backward(); ref.step(); ref.zero_grad()
        with fused.step_hooks_enabled():
            a(ids, labels=ids).loss.backward()
    diff = max((p - q).abs().max().item() for p, q in zip(a.parameters(), b.parameters()))
    print(f"cuda {algo}: max |fused - torch| = {diff:.3g}")
PY
python3 benchmarks/lomo_memory.py --models small,smollm2-shape --device cuda --steps 3 | tee $OUT/table.txt
cp benchmarks/results/lomo_memory_cuda.json $OUT/
