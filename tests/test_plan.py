"""Parameter & memory report, and `deltatune plan` from a config alone (meta device)."""

import pytest
import torch

from deltatune.analysis.memory import activation_bytes, parameter_report, parse_bytes, plan_finetune, resolve_config
from deltatune.cli import main
from deltatune.errors import UserError
from deltatune.methods.apply import apply_methods
from deltatune.methods.base import MethodSpec
from deltatune.testing import tiny_llama_config, tiny_model

CFG = tiny_llama_config()
H, I, L, V = CFG.hidden_size, CFG.intermediate_size, CFG.num_hidden_layers, CFG.vocab_size
KV = CFG.num_key_value_heads * H // CFG.num_attention_heads
SHAPES = {
    "q_proj": (H, H),
    "k_proj": (H, KV),
    "v_proj": (H, KV),
    "o_proj": (H, H),
    "gate_proj": (H, I),
    "up_proj": (H, I),
    "down_proj": (I, H),
}
BASE_TOTAL = V * H + L * (sum(a * b for a, b in SHAPES.values()) + 2 * H) + H  # tied head, 2 norms/layer + final

SPECS = {
    "lora": [MethodSpec(name="lora", rank=4)],
    "lora-qv+norms": [
        MethodSpec(name="lora", rank=2, targets="q_proj,v_proj"),
        MethodSpec(name="full", targets=".*norm"),
    ],
    "full": [MethodSpec(name="full")],
    "full-layer1": [MethodSpec(name="full", targets="model.layers.1")],
}


def test_lora_counts_equal_the_formula():
    r = 4
    report = plan_finetune(CFG, SPECS["lora"], dtype="fp32", batch_size=1, seq_len=8).params
    per_matrix = {k: r * (a + b) for k, (a, b) in SHAPES.items()}  # r * (d_in + d_out)
    assert report.trainable == L * sum(per_matrix.values())
    assert report.total == BASE_TOTAL + report.trainable
    for kind, count in per_matrix.items():
        assert report.by_type[kind] == [L * (SHAPES[kind][0] * SHAPES[kind][1] + count), L * count]
    assert report.by_type["norm"] == [(2 * L + 1) * H, 0] and report.by_type["embed_tokens"] == [V * H, 0]
    assert report.percent == pytest.approx(100 * report.trainable / report.total)


@pytest.mark.parametrize("case", list(SPECS))
def test_meta_plan_equals_a_materialised_model(case):
    planned = plan_finetune(CFG, SPECS[case], dtype="fp32", batch_size=1, seq_len=8).params
    real = parameter_report(apply_methods(tiny_model(0), SPECS[case]))
    assert planned.to_dict() == real.to_dict()


def test_bytes_follow_dtypes():
    spec = [MethodSpec(name="lora", rank=4, options={"adapter_dtype": "fp32"})]
    p = plan_finetune(CFG, spec, dtype="bf16", batch_size=1, seq_len=8).params
    assert p.weight_bytes == 2 * BASE_TOTAL + 4 * p.trainable  # bf16 base, fp32 adapters
    assert p.gradient_bytes == p.adapter_bytes == 4 * p.trainable
    assert p.optimizer_bytes == 8 * p.trainable
    full = plan_finetune(CFG, SPECS["full"], dtype="bf16", batch_size=1, seq_len=8).params
    # deltatune train keeps full finetuning's weights in fp32 (master weights) whatever the frozen dtype
    assert full.trainable == full.total == BASE_TOTAL and full.gradient_bytes == 4 * BASE_TOTAL


@pytest.mark.parametrize(
    "name,total", [("llama-7b", 6_738_415_616), ("llama-70b", 68_976_648_192), ("smollm2-135m", 134_515_008)]
)
def test_builtin_sizes_match_published_parameter_counts(name, total):
    assert plan_finetune(name, SPECS["full"], dtype="bf16").params.total == total


def test_activation_estimate_is_within_30_percent_of_what_autograd_saves():
    """Sum the bytes autograd actually keeps for backward (saved-tensor hooks) and compare."""
    for attn, spec in (("eager", SPECS["lora"]), ("sdpa", SPECS["full"])):
        model = tiny_model(0, attn_implementation=attn)
        apply_methods(model, spec)
        model.train()
        storages: dict[int, int] = {}

        def pack(t):
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        ids = torch.randint(3, V, (2, 64), generator=torch.Generator().manual_seed(0))
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model(input_ids=ids, labels=ids)
        weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
        measured = sum(n for ptr, n in storages.items() if ptr not in weights)
        estimate = plan_finetune(
            CFG, spec, dtype="fp32", batch_size=2, seq_len=64, materialised_attention=attn == "eager"
        ).activation_bytes
        assert 0.7 * measured <= estimate <= 1.3 * measured, (attn, measured, estimate)


@pytest.mark.parametrize("method", ["vera", "lora", "prompt"])
def test_adapter_bytes_are_the_tensors_the_adapter_file_holds(tmp_path, method):
    """VeRA's file holds its shared random matrices beside the trained vectors; plan left them out (4,320 bytes
    planned, 8,416 written here; about 5x at 7B)."""
    from safetensors import safe_open

    specs = [MethodSpec(name=method, rank=4)]
    adapted = apply_methods(tiny_model(0), specs)
    adapted.save_adapter(tmp_path / "a")
    written = 0
    for file in (tmp_path / "a").glob("*.safetensors"):
        with safe_open(str(file), "pt") as fh:
            written += sum(fh.get_tensor(k).nbytes for k in fh.keys())
    planned = plan_finetune(CFG, specs, dtype="fp32", batch_size=1, seq_len=8).params
    assert planned.adapter_bytes == written
    assert planned.weight_bytes == 4 * BASE_TOTAL + planned.adapter_bytes  # the shared matrices are held too


def _saved_numel_per_token(layer: torch.nn.Module, d_in: int) -> float:
    """Numbers autograd keeps for `layer`'s backward per token, beyond its input and its own tensors: the
    difference between 96 and 32 tokens, so that what does not grow with the tokens cancels."""

    def saved(tokens: int) -> int:
        x = torch.randn(tokens, d_in, requires_grad=True)
        own = {t.untyped_storage().data_ptr() for t in (*layer.parameters(), *layer.buffers(), x)}
        storages: dict[int, int] = {}

        def pack(t):
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes() // t.element_size()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            layer(x).sum()
        return sum(n for ptr, n in storages.items() if ptr not in own)

    return (saved(96) - saved(32)) / 64


@pytest.mark.parametrize("shape", [(576, 576), (576, 192), (1536, 576)])
def test_mora_and_ia3_count_what_backward_keeps_per_token(shape):
    """`plan` counted nothing for MoRA and (IA)3 (the base class's 0): MoRA's type 6 (its default) keeps a
    wrap-padded copy of the input, 2.2x the input on a 576->192 layer, and was planned below LoRA."""
    from deltatune.methods.ia3 import IA3Linear
    from deltatune.methods.mora import MoRALinear

    d_in, d_out = shape
    layers = [MoRALinear(torch.nn.Linear(d_in, d_out, bias=False), 8, mora_type=t) for t in (6, 1, 2, "truncate")]
    layers += [IA3Linear(torch.nn.Linear(d_in, d_out, bias=False), feedforward=ff) for ff in (False, True)]
    for layer in layers:
        layer.train()
        assert layer.activation_numel_per_token() == _saved_numel_per_token(layer, d_in), layer
    # dropout adds its output, as LoRA counts it (its one-byte mask is left out of both)
    dropped = MoRALinear(torch.nn.Linear(d_in, d_out, bias=False), 8, mora_type=6, dropout=0.1)
    assert dropped.activation_numel_per_token() == layers[0].activation_numel_per_token() + d_in


def test_gradient_checkpointing_keeps_layer_inputs_only():
    kw = dict(batch_size=2, seq_len=16, dtype=torch.float32)
    full = activation_bytes(CFG, gradient_checkpointing=False, **kw)
    ckpt = activation_bytes(CFG, gradient_checkpointing=True, **kw)
    per_layer = 2 * 16 * (7 * H + 3 * KV + 4 * I) * 4
    logits = 2 * 16 * V * 4 + 2 * 2 * 16 * H * 4  # one fp32 chunk (all 32 positions) + hidden and its gradient
    assert full == L * per_layer + logits
    assert ckpt == L * 2 * 16 * H * 4 + per_layer + logits


def test_parse_bytes():
    assert parse_bytes("24GiB") == parse_bytes("24GB") == parse_bytes("24G") == 24 * 1024**3
    assert parse_bytes("512MiB") == 512 * 1024**2 and parse_bytes("1000") == 1000
    with pytest.raises(UserError, match="gpu-memory"):
        parse_bytes("lots")
    for nothing in ("0", "0GiB", "0.0001"):  # 'fits in 0 bytes' was answered as if it were a size
        with pytest.raises(UserError, match="gpu-memory.*more than"):
            parse_bytes(nothing)


def test_default_model_config_resolves_offline():
    _, config = resolve_config(None)
    assert (config.hidden_size, config.num_hidden_layers, config.vocab_size) == (576, 30, 49152)


def test_cli_plan_llama_7b_and_70b(capsys):
    assert (
        main(
            [
                "plan",
                "--model",
                "llama-7b",
                "--method",
                "lora",
                "--rank",
                "8",
                "--gpu-memory",
                "24GiB",
                "--seq-len",
                "256",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    lora_7b = 32 * 8 * (4 * (4096 + 4096) + 3 * (4096 + 11008))  # q,k,v,o square; gate, up, down
    assert f"trainable {lora_7b:,}" in out and "fits in 24.00 GiB" in out
    assert main(["plan", "--model", "llama-70b", "--method", "lora", "--gpu-memory", "24GiB"]) == 0
    assert "does NOT fit" in capsys.readouterr().out


def test_cli_plan_from_a_folder_and_errors(tmp_path, capsys):
    CFG.save_pretrained(tmp_path / "m")
    assert main(["plan", "--model", str(tmp_path / "m"), "--method", "lora", "--rank", "4", "--targets", "q_proj"]) == 0
    assert f"trainable {L * 4 * 2 * H:,}" in capsys.readouterr().out
    assert main(["plan", "--model", str(tmp_path), "--method", "lora"]) == 2
    assert "no config.json" in capsys.readouterr().err
    assert main(["plan", "--model", "llama-7b", "--method", "lora", "--targets", "qproj"]) == 2
    err = capsys.readouterr().err
    assert "q_proj" in err and len(err.strip().splitlines()) == 1


def test_a_plan_that_does_not_fit_says_what_would_and_that_does(capsys):
    """A plan that does not fit names the settings that would: fewer rows a micro-batch with grad_accum keeping the
    step's rows, and gradient checkpointing; each suggestion, planned, fits."""
    args = ["plan", "--model", "llama-7b", "--method", "lora", "--rank", "16", "--gpu-memory", "24GiB"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "does NOT fit" in out and "--batch-size 2 with --set grad_accum=2 fits" in out
    assert "--gradient-checkpointing fits" in out
    for extra in (["--batch-size", "2"], ["--gradient-checkpointing"]):
        assert main(args + extra) == 0
        out = capsys.readouterr().out
        assert "fits in 24.00 GiB" in out and "what would fit" not in out
