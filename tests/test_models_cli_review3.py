"""Defects found reviewing model loading (GGUF), merge/export and file outputs: each test failed before its fix."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from reliability_helpers import cli

import deltatune
from deltatune.testing import tiny_model, tiny_tokenizer

IDS = torch.arange(1, 300).unsqueeze(0)  # long enough for RoPE's scaling to show
LINEAR_ROPE = {"rope_type": "linear", "factor": 4.0, "rope_theta": 10000.0}


def logits(model, ids: torch.Tensor = IDS) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


def _permuted(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf layout of the q/k rows (transformers' loader undoes it)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def llama_cpp_rope_freqs(rope: dict, head_dim: int) -> np.ndarray:
    """The per-dimension factors llama.cpp's convert_hf_to_gguf writes as rope_freqs.weight for Llama 3 RoPE."""
    import math

    freqs = 1.0 / (rope["rope_theta"] ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    old, low, high, factor = (
        rope[k] for k in ("original_max_position_embeddings", "low_freq_factor", "high_freq_factor", "factor")
    )
    factors = []
    for freq in freqs.tolist():
        wavelen = 2 * math.pi / freq
        if wavelen < old / high:
            factors.append(1.0)
        elif wavelen > old / low:
            factors.append(factor)
        else:
            smooth = (old / wavelen - low) / (high - low)
            factors.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(factors, dtype=np.float32)


def write_tiny_gguf(
    path: Path,
    model,
    tokenizer,
    *,
    rope_scaling: tuple[str, float] | None = None,
    rope_freqs: np.ndarray | None = None,
) -> Path:
    """The tiny Llama as llama.cpp writes it (F32 tensors, GPT-2 tokenizer metadata, no output.weight: tied)."""
    import gguf

    cfg = model.config
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("tiny")
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_rope_dimension_count(cfg.hidden_size // cfg.num_attention_heads)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
    w.add_vocab_size(cfg.vocab_size)
    if rope_scaling is not None:
        w.add_rope_scaling_type(gguf.RopeScalingType(rope_scaling[0]))
        w.add_rope_scaling_factor(rope_scaling[1])
        w.add_rope_scaling_orig_ctx_len(cfg.max_position_embeddings)
    tokens = [t for t, _ in sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types([3 if i in set(tokenizer.all_special_ids) else 1 for i in range(len(tokens))])
    merges = json.loads(tokenizer.backend_tokenizer.to_str())["model"]["merges"]
    w.add_token_merges([" ".join(m) if isinstance(m, list) else m for m in merges])
    w.add_bos_token_id(cfg.bos_token_id)
    w.add_eos_token_id(cfg.eos_token_id)
    w.add_pad_token_id(cfg.pad_token_id)
    sd = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
    w.add_tensor("token_embd.weight", sd["model.embed_tokens.weight"])
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        w.add_tensor(f"blk.{i}.attn_norm.weight", sd[p + "input_layernorm.weight"])
        w.add_tensor(f"blk.{i}.attn_q.weight", _permuted(sd[p + "self_attn.q_proj.weight"], cfg.num_attention_heads))
        w.add_tensor(f"blk.{i}.attn_k.weight", _permuted(sd[p + "self_attn.k_proj.weight"], cfg.num_key_value_heads))
        w.add_tensor(f"blk.{i}.attn_v.weight", sd[p + "self_attn.v_proj.weight"])
        w.add_tensor(f"blk.{i}.attn_output.weight", sd[p + "self_attn.o_proj.weight"])
        w.add_tensor(f"blk.{i}.ffn_norm.weight", sd[p + "post_attention_layernorm.weight"])
        w.add_tensor(f"blk.{i}.ffn_gate.weight", sd[p + "mlp.gate_proj.weight"])
        w.add_tensor(f"blk.{i}.ffn_up.weight", sd[p + "mlp.up_proj.weight"])
        w.add_tensor(f"blk.{i}.ffn_down.weight", sd[p + "mlp.down_proj.weight"])
    w.add_tensor("output_norm.weight", sd["model.norm.weight"])
    if rope_freqs is not None:
        w.add_tensor("rope_freqs.weight", rope_freqs)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def load(folder) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()


# --- 1. export / merge of a GGUF model --------------------------------------------------------------
def test_export_of_a_gguf_model_writes_a_folder_with_its_logits(capsys, tmp_path):
    """transformers' GGUF loader left its (unserialisable) quantizer on the dequantised model: `deltatune export
    --model x.gguf` ended in a ValueError traceback from save_pretrained, and so did merge onto a GGUF base."""
    model = tiny_model()
    gguf_path = write_tiny_gguf(tmp_path / "tiny.gguf", model, tiny_tokenizer())
    rc, _, err = cli(capsys, "export", "--model", gguf_path, "--out", tmp_path / "out")
    assert rc == 0, err
    exported = load(tmp_path / "out")
    assert exported.config.tie_word_embeddings
    assert "quantization_config" not in json.loads((tmp_path / "out" / "config.json").read_text())
    torch.testing.assert_close(logits(exported), logits(model), atol=1e-5, rtol=0)

    adapted = deltatune.apply(tiny_model(), "lora", rank=4, targets="q_proj,v_proj")
    with torch.no_grad():
        for _, p in adapted.trainable_parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(1)) * 0.1)
    adapted.save_adapter(tmp_path / "a")
    rc, _, err = cli(
        capsys, "merge", "--model", gguf_path, "--adapter", tmp_path / "a", "--out", tmp_path / "m", "--overwrite"
    )
    assert rc == 0, err
    torch.testing.assert_close(logits(load(tmp_path / "m")), logits(adapted), atol=1e-5, rtol=0)


# --- 2. a GGUF's RoPE scaling -------------------------------------------------------------------------
def test_a_gguf_with_linear_rope_scaling_loads_with_it(tmp_path):
    """transformers' GGUF loader reads no `llama.rope.scaling.*` key: a file written with linear scaling x4 loaded
    as unscaled RoPE (rope_type 'default'), so every position past 0 computed otherwise than the model."""
    from deltatune.models import load_model

    model = tiny_model(rope_parameters=LINEAR_ROPE)
    path = write_tiny_gguf(tmp_path / "lin.gguf", model, tiny_tokenizer(), rope_scaling=("linear", 4.0))
    loaded, _ = load_model(str(path))
    assert loaded.config.rope_parameters["rope_type"] == "linear"
    assert loaded.config.rope_parameters["factor"] == 4.0
    torch.testing.assert_close(logits(loaded), logits(model), atol=1e-6, rtol=0)


def test_a_gguf_rope_scaling_deltatune_cannot_reproduce_is_one_line_naming_the_file(capsys, tmp_path):
    path = write_tiny_gguf(tmp_path / "yarn.gguf", tiny_model(), tiny_tokenizer(), rope_scaling=("yarn", 4.0))
    rc, _, err = cli(capsys, "export", "--model", path, "--out", tmp_path / "out")
    assert rc == 2, err
    assert len(err.strip().splitlines()) == 1 and str(path) in err and "yarn" in err, err
    assert not (tmp_path / "out").exists()


LLAMA31_ROPE = {  # Meta's Llama 3.1 values
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
    "rope_theta": 10000.0,
}
OTHER_LLAMA3_ROPE = {  # two dimensions between the bands, so the parameters are found by a fit
    "rope_type": "llama3",
    "factor": 4.0,
    "low_freq_factor": 2.0,
    "high_freq_factor": 32.0,
    "original_max_position_embeddings": 1024,
    "rope_theta": 10000.0,
}


@pytest.mark.parametrize("rope", [LLAMA31_ROPE, OTHER_LLAMA3_ROPE], ids=["llama3.1-values", "fitted"])
def test_a_gguf_with_llama3_rope_factors_loads_with_the_same_positions(rope, tmp_path):
    """llama.cpp keeps a Llama 3.1+ model's RoPE scaling only as per-dimension factors (tensor rope_freqs.weight),
    which transformers' GGUF loader ignores; deltatune refused such a file. The config now gets llama3 parameters
    that give the same frequencies, and the model its logits."""
    from deltatune.models import load_model

    model = tiny_model(rope_parameters=rope, max_position_embeddings=16384)
    factors = llama_cpp_rope_freqs(rope, head_dim=16)
    assert 1.0 < factors.max() and (factors == 1.0).any()  # both bands in play
    path = write_tiny_gguf(tmp_path / "l3.gguf", model, tiny_tokenizer(), rope_freqs=factors)
    loaded, _ = load_model(str(path))
    assert loaded.config.rope_parameters["rope_type"] == "llama3"
    if rope is LLAMA31_ROPE:
        assert {k: loaded.config.rope_parameters[k] for k in rope} == rope
    ids = (torch.arange(2000) % 500 + 1).unsqueeze(0)  # far enough for the longest wavelengths to turn
    torch.testing.assert_close(logits(loaded, ids), logits(model, ids), atol=1e-5, rtol=0)
    unscaled = tiny_model(rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    assert (logits(unscaled, ids) - logits(model, ids)).abs().max() > 1e-3  # the scaling shows at these positions


def test_gguf_rope_factors_that_follow_no_llama3_scaling_are_one_line_naming_the_file(capsys, tmp_path):
    factors = np.array([1.0, 3.0, 1.0, 2.0, 5.0, 1.0, 7.0, 8.0], dtype=np.float32)
    path = write_tiny_gguf(tmp_path / "odd.gguf", tiny_model(), tiny_tokenizer(), rope_freqs=factors)
    rc, _, err = cli(capsys, "export", "--model", path, "--out", tmp_path / "out")
    assert rc == 2, err
    assert len(err.strip().splitlines()) == 1 and str(path) in err and "rope_freqs" in err, err
    assert not (tmp_path / "out").exists()


# --- 3. files written follow the umask ---------------------------------------------------------------
def test_weights_files_follow_the_umask_as_the_other_files(capsys, tiny_dir, tmp_path):
    """safetensors writes its files 0600 whatever the umask: an exported or merged model.safetensors (and every
    adapter, checkpoint and snapshot) was unreadable to the group its folder and config.json were shared with."""
    old = os.umask(0o022)
    try:
        rc, _, err = cli(capsys, "export", "--model", tiny_dir, "--out", tmp_path / "exported")
    finally:
        os.umask(old)
    assert rc == 0, err
    modes = {p.name: p.stat().st_mode & 0o777 for p in (tmp_path / "exported").iterdir()}
    assert modes["model.safetensors"] == 0o644, modes
    assert set(modes.values()) == {0o644}, modes


def test_a_real_gguf_loaded_in_bf16_computes_as_the_same_model_loaded_from_a_folder(tmp_path):
    """The dense GGUF load (no quantizer) still casts as from_pretrained does: RoPE's inv_freq stays float32."""
    from deltatune.models import load_model, save_model

    model = tiny_model()
    path = write_tiny_gguf(tmp_path / "tiny.gguf", model, tiny_tokenizer())
    folder = save_model(model, tiny_tokenizer(), tmp_path / "folder")
    from_gguf, _ = load_model(str(path), dtype="bf16")
    from_folder, _ = load_model(str(folder), dtype="bf16")
    assert from_gguf.model.rotary_emb.inv_freq.dtype == torch.float32
    assert {p.dtype for p in from_gguf.parameters()} == {torch.bfloat16}
    assert torch.equal(logits(from_gguf), logits(from_folder))


def test_an_adapter_on_a_gguf_model_records_the_file_as_its_base(tmp_path):
    """The loader named the GGUF's folder as the model: an adapter saved on it recorded the folder, so merge and
    generate --adapter failed there ("no config.json"), or used another model the folder held."""
    from deltatune.models import load_model

    model = tiny_model()
    path = write_tiny_gguf(tmp_path / "tiny.gguf", model, tiny_tokenizer())
    loaded, _ = load_model(str(path))
    adapted = deltatune.apply(loaded, "lora", rank=4, targets="q_proj")
    adapted.save_adapter(tmp_path / "a")
    config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(path.resolve())
    merged, _ = load_model(None, adapter=tmp_path / "a")  # the adapter's own base
    torch.testing.assert_close(logits(merged), logits(model), atol=1e-5, rtol=0)
