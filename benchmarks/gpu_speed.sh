# Issue 13's GPU part on a lent GPU machine: the varlen attention check, then train_speed.py's contenders on
# CUDA (bf16, random weights in SmolLM2-135M's shapes: the real weights are too large to carry).
#
# Prepare here, once (the machine has no network; see /work/.library/device/README.md):
#   echo /.gpu/ >> .git/info/exclude; echo /.whl/ >> .git/info/exclude; mkdir -p .gpu/model
#   cp ~/.cache/deltatune/models/SmolLM2-135M-Instruct/{config.json,generation_config.json,tokenizer.json,tokenizer_config.json,chat_template.jinja} .gpu/model/
#   head -n 2048 ../shared/data/gsm8k/train.jsonl > .gpu/gsm8k_train.jsonl
#   bash benchmarks/gpu_wheels.sh   # the wheels the image lacks or has too old (22 MB: transformers 5.23, trl,
#                                   # datasets, pydantic, huggingface_hub and their needs), into .whl
# Then: run(command="bash benchmarks/gpu_speed.sh", carry=[".gpu", ".whl"], timeout_s=540).
# Writes $OUT/gpu_speed.json (train_speed.py's record) and $OUT/varlen_check.txt. A dry run of everything but the
# kernel check on a CPU machine: DEVICE=cpu BATCH=4 STEPS=2 OUT=/tmp/out bash benchmarks/gpu_speed.sh
set -x -o pipefail
DEVICE=${DEVICE:-cuda}
[ -d .whl ] && { python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1; }
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
python3 -c "import torch, transformers; print(torch.__version__, transformers.__version__, torch.cuda.is_available() and torch.cuda.get_device_name())"
case "$DEVICE" in cuda*) python3 - "$DEVICE" <<'PY' 2>&1 | tee "$OUT/varlen_check.txt" || echo "varlen check FAILED";;
# varlen attention against the span kernel and float64 per-example SDPA, on CUDA, bf16, GSM8K-sized spans
import sys
import torch
import torch.nn.functional as F
from deltatune.train import packed_attention as pa
torch.manual_seed(0)
lengths = [164, 229, 190, 194, 300, 17, 512]
starts = [sum(lengths[:i]) for i in range(len(lengths))]
spans = [[(s, s + n) for s, n in zip(starts, lengths)]]
T = sum(lengths)
device = sys.argv[1] if len(sys.argv) > 1 else "cuda"
q, k, v = (torch.randn(1, T, h, 64, device=device).transpose(1, 2) for h in (9, 3, 3))
g = torch.randn(1, T, 9, 64, device=device)
def run(fn, dtype):
    x = [t.to(dtype).detach().requires_grad_() for t in (q, k, v)]
    out = fn(*x)
    out.backward(g.to(dtype))
    return [out.double()] + [t.grad.double() for t in x]
def exact(q, k, v):
    parts = [F.scaled_dot_product_attention(q[:, :, s:e], k[:, :, s:e].repeat_interleave(3, 1),
             v[:, :, s:e].repeat_interleave(3, 1), is_causal=True) for s, e in spans[0]]
    return torch.cat(parts, 2).transpose(1, 2)
print("varlen usable:", pa.varlen_usable(q.bfloat16()))
ref = run(exact, torch.float64)
varlen = run(lambda *x: pa.varlen_attention(*x, spans, 64**-0.5), torch.bfloat16)
span = run(lambda *x: pa.SpanAttention.apply(x[0][0], x[1][0], x[2][0], spans[0], 64**-0.5).unsqueeze(0), torch.bfloat16)
worst = 0.0
for name, a, b, r in zip(["out", "dq", "dk", "dv"], varlen, span, ref):
    err_varlen, err_span = (a - r).abs().max().item(), (b - r).abs().max().item()
    print(f"{name}: varlen max|err| {err_varlen:.2e}, span kernel {err_span:.2e}")
    worst = max(worst, err_varlen / max(err_span, 1e-3))
# both kernels round to bf16: varlen must be as close to float64 as the span kernel, within a factor of 2
print("varlen check", "ok" if worst <= 2 else "FAILED", f"(worst error ratio {worst:.2f})")
sys.exit(0 if worst <= 2 else 1)
PY
esac
python3 - <<'PY'
# random weights in the real model's shapes, with its tokenizer (.gpu/model holds no weights)
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
torch.manual_seed(0)
AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(".gpu/model")).save_pretrained("/tmp/gpu-model")
AutoTokenizer.from_pretrained(".gpu/model").save_pretrained("/tmp/gpu-model")
PY
# one repeat of each by default (~25 s a contender with start-up): REPEATS=2 where the device time allows
timeout 420 python3 benchmarks/train_speed.py --device "$DEVICE" --batch "${BATCH:-32}" --only gpu --steps "${STEPS:-10}" \
  --warmup 3 --repeats "${REPEATS:-1}" \
  --model /tmp/gpu-model --data .gpu/gsm8k_train.jsonl --out "$OUT/gpu_speed.json" 2>&1 \
  || echo "train_speed rc=$?"
