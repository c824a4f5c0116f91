"""Review 3 of the training fast paths: model families whose attention or logits are more than Llama's.

Sliding-window layers (Mistral, Qwen2, Phi3, Gemma2) must attend within their window under packed attention
as they do alone; attention that packed attention does not compute (Gemma2's soft-capped scores) must be
refused, not silently computed without the cap."""

import pytest
import torch

from deltatune.train import packed_attention

COMMON = dict(
    vocab_size=64,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
)


def _qkv(lengths, heads=6, kv_heads=2, dim=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (
        torch.randn(1, sum(lengths), h, dim, generator=g, dtype=torch.float64).transpose(1, 2)
        for h in (heads, kv_heads, kv_heads)
    )
    starts = [sum(lengths[:i]) for i in range(len(lengths))]
    return q, k, v, [[(s, s + n) for s, n in zip(starts, lengths)]]


def _windowed_reference(q, k, v, spans, window, scale):
    """Per-span SDPA with transformers' sliding-window mask (query i sees keys i - window < j <= i)."""
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
    parts = []
    for s, e in spans[0]:
        i = torch.arange(e - s)
        allowed = (i[None, :] <= i[:, None]) & (i[None, :] > i[:, None] - window)
        parts.append(
            torch.nn.functional.scaled_dot_product_attention(
                q[:, :, s:e], k[:, :, s:e], v[:, :, s:e], attn_mask=allowed, scale=scale
            )
        )
    return torch.cat(parts, 2).transpose(1, 2)


def _value_and_grads(fn, q, k, v, grad_out):
    q, k, v = (x.detach().requires_grad_() for x in (q, k, v))
    out = fn(q, k, v)
    out.backward(grad_out)
    return [out.detach(), q.grad, k.grad, v.grad]


@pytest.mark.parametrize("whole, block, keep", [(10**9, 32, 256), (32, 32, 0), (0, 64, 256)])
def test_span_attention_honours_a_sliding_window_in_value_and_gradient(monkeypatch, whole, block, keep):
    monkeypatch.setattr(packed_attention, "WHOLE_SPAN", whole)
    monkeypatch.setattr(packed_attention, "QUERY_BLOCK", block)
    monkeypatch.setattr(packed_attention, "KEEP_PROBABILITIES", keep)
    lengths = [7, 1, 30, 12, 2, 70, 5]  # spans shorter and longer than the window, one of one token
    q, k, v, spans = _qkv(lengths)
    grad_out = torch.randn(1, sum(lengths), 6, 16, dtype=torch.float64)
    for window in (1, 5, 33):
        fn = lambda *x: packed_attention.span_attention(*x, spans, 0.3, window)  # noqa: E731
        ours = _value_and_grads(fn, q, k, v, grad_out)
        ref = _value_and_grads(lambda *x: _windowed_reference(*x, spans, window, 0.3), q, k, v, grad_out)
        for name, a, b in zip(["out", "dq", "dk", "dv"], ours, ref):
            assert torch.allclose(a, b, atol=1e-12), (window, name, (a - b).abs().max())


def test_the_varlen_path_passes_the_window_on(monkeypatch):
    """The CUDA path's kernel gets flash's window_size (window - 1, 0): checked through a float64 stand-in."""
    windows = []

    def varlen_attn(query, key, value, cu_q, cu_k, max_q, max_k, *, scale=None, window_size=(-1, -1), enable_gqa=False):
        windows.append(window_size)
        bounds = cu_q.tolist()
        left = window_size[0]
        parts = []
        for a, b in zip(bounds, bounds[1:]):
            i = torch.arange(b - a)
            allowed = (i[None, :] <= i[:, None]) & ((i[None, :] >= i[:, None] - left) if left >= 0 else True)
            parts.append(
                torch.nn.functional.scaled_dot_product_attention(
                    query[a:b].transpose(0, 1),
                    key[a:b].transpose(0, 1),
                    value[a:b].transpose(0, 1),
                    attn_mask=allowed,
                    scale=scale,
                    enable_gqa=enable_gqa,
                ).transpose(0, 1)
            )
        return torch.cat(parts)

    monkeypatch.setattr(packed_attention, "_varlen_attn", varlen_attn)
    q, k, v, spans = _qkv([9, 1, 20])
    for window in (4, 1000):
        ours = packed_attention.varlen_attention(q, k, v, spans, 0.3, window)
        ref = _windowed_reference(q, k, v, spans, window, 0.3)
        assert torch.allclose(ours, ref, atol=1e-12), window
    assert windows == [(3, 0), (-1, 0)]


def _alone_and_packed(model, lengths, seed=0, reference="sdpa"):
    """The decoder's last hidden states for examples run one at a time, and packed end to end in one row
    with packed attention; and the gradient of o_proj of the first layer for each."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 64, (1, sum(lengths)), generator=g)
    pos = torch.cat([torch.arange(n) for n in lengths])[None]
    starts = [sum(lengths[:i]) for i in range(len(lengths))]
    decoder = model.get_decoder()
    weight = decoder.layers[0].self_attn.o_proj.weight
    model.set_attn_implementation(reference)
    alone = torch.cat(
        [
            decoder(input_ids=ids[:, s : s + n], position_ids=pos[:, s : s + n]).last_hidden_state
            for s, n in zip(starts, lengths)
        ],
        1,
    )
    direction = torch.randn(alone.shape, generator=g, dtype=alone.dtype)  # not pow(2): the final norm fixes that sum
    (alone * direction).sum().backward()
    alone_grad, weight.grad = weight.grad.clone(), None
    model.set_attn_implementation(packed_attention.register())
    spans = packed_attention.spans_from_position_ids(pos)
    packed = decoder(input_ids=ids, position_ids=pos, packed_spans=spans).last_hidden_state
    (packed * direction).sum().backward()
    packed_grad, weight.grad = weight.grad.clone(), None
    return alone.detach(), packed.detach(), alone_grad, packed_grad


@pytest.mark.parametrize("family", ["mistral", "qwen2", "phi3"])
def test_packed_sliding_window_models_equal_each_example_alone(family):
    import transformers as tf

    torch.manual_seed(0)
    if family == "mistral":
        model = tf.MistralForCausalLM(tf.MistralConfig(**COMMON, sliding_window=4))
    elif family == "qwen2":
        config = tf.Qwen2Config(**COMMON, use_sliding_window=True, sliding_window=4, max_window_layers=0)
        model = tf.Qwen2ForCausalLM(config)
    else:
        model = tf.Phi3ForCausalLM(tf.Phi3Config(**COMMON, sliding_window=4, pad_token_id=0, eos_token_id=1))
    model = model.double()
    assert packed_attention.supported(model)
    alone, packed, alone_grad, packed_grad = _alone_and_packed(model, [7, 1, 12])
    assert (packed - alone).abs().max() < 1e-10  # was 0.7-1.1: the window was ignored
    assert torch.allclose(packed_grad, alone_grad, atol=1e-10)


def test_soft_capped_attention_is_refused_not_computed_without_the_cap():
    import transformers as tf

    torch.manual_seed(0)
    config = tf.Gemma2Config(**COMMON, head_dim=16, attn_logit_softcapping=2.0, query_pre_attn_scalar=16)
    model = tf.Gemma2ForCausalLM(config).double()
    assert not packed_attention.supported(model)
    assert "attn_logit_softcapping" in packed_attention.unsupported_reason(model)
    model.set_attn_implementation(packed_attention.register())  # forced anyway: an error, not other numbers
    ids = torch.randint(1, 64, (1, 12))
    pos = torch.cat([torch.arange(5), torch.arange(7)])[None]
    with pytest.raises(ValueError, match="softcap"):
        model.get_decoder()(input_ids=ids, position_ids=pos, packed_spans=packed_attention.spans_from_position_ids(pos))
    # without the cap, Gemma2 (sliding-window layers, head_dim not hidden/heads) packs exactly
    config = tf.Gemma2Config(
        **COMMON, head_dim=16, attn_logit_softcapping=None, sliding_window=4, query_pre_attn_scalar=16
    )
    model = tf.Gemma2ForCausalLM(config).double()
    assert packed_attention.supported(model)
    # Gemma2 has no SDPA in transformers; its eager softmax runs in float32, hence the tolerance
    alone, packed, alone_grad, packed_grad = _alone_and_packed(model, [7, 1, 12], reference="eager")
    assert (packed - alone).abs().max() < 1e-5
    assert torch.allclose(packed_grad, alone_grad, atol=1e-5)


def _causal_lm(family, vocab_size: int = COMMON["vocab_size"]):
    import transformers as tf

    torch.manual_seed(0)
    common = {**COMMON, "vocab_size": vocab_size}
    if family == "gemma2":
        return tf.Gemma2ForCausalLM(tf.Gemma2Config(**common, head_dim=16, final_logit_softcapping=1.5))
    if family == "cohere":  # logit_scale 0.0625 by default
        return tf.CohereForCausalLM(tf.CohereConfig(**common, eos_token_id=1))
    return tf.GraniteForCausalLM(tf.GraniteConfig(**common, logits_scaling=8.0))


@pytest.mark.parametrize("family", ["gemma2", "cohere", "granite"])
def test_the_chunked_loss_is_the_models_own_loss_for_models_that_transform_their_logits(family):
    """Gemma2 soft-caps its logits, Cohere and Granite scale them: the loss from the head must do the same
    (it was 35.2 instead of 4.96 for this Gemma2, 28.9 instead of 4.04 for Cohere, 12.5 instead of 4.27 for
    Granite), in value and in the gradients of the hidden states and the head."""
    from deltatune.train.loss import logit_transform, weighted_lm_loss_sum

    model = _causal_lm(family).double().eval()
    head = model.get_output_embeddings()
    with torch.no_grad():
        head.weight.mul_(50)  # logits large enough for the cap and the scale to matter
    ids = torch.randint(1, 64, (2, 19), generator=torch.Generator().manual_seed(1))
    weights = torch.rand(2, 19, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    hidden = model.get_decoder()(input_ids=ids).last_hidden_state.detach().requires_grad_()
    # the model's own logits, as its forward makes them (checked against that forward below)
    own = model(input_ids=ids).logits.detach()
    transform = logit_transform(model)

    def reference(h):  # float64, full logits, the model's transform written out
        z = model.lm_head(h) * transform.scale
        if transform.softcap is not None:
            z = transform.softcap * torch.tanh(z / transform.softcap)
        nll = -torch.log_softmax(z[:, :-1], -1).gather(-1, ids[:, 1:, None]).squeeze(-1)
        return (nll * weights[:, 1:]).sum(), z

    ref, z = reference(hidden)
    assert torch.allclose(z, own, atol=1e-10)  # the written-out transform is the model's
    ref_grads = torch.autograd.grad(ref, [hidden, head.weight])
    for chunk in (5, 1024):  # chunk boundaries inside the rows, and one chunk
        total, w = weighted_lm_loss_sum(hidden, head, ids, weights, chunk=chunk, transform=transform)
        assert torch.allclose(total, ref, atol=1e-10), (chunk, float(total), float(ref))
        grads = torch.autograd.grad(total, [hidden, head.weight])
        for name, a, b in zip(["hidden", "head"], grads, ref_grads):
            assert torch.allclose(a, b, atol=1e-10), (chunk, name, (a - b).abs().max())


def test_a_padded_batch_without_spans_keeps_its_padding_out():
    """Switched to packed attention but called without spans (the documented SDPA fallback), a padded batch
    is computed as by SDPA: its padding mask was dropped (logits moved by 0.58)."""
    from deltatune.testing import tiny_model

    model = tiny_model().double()
    ids = torch.randint(1, 100, (2, 10), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(2, 10, dtype=torch.long)
    mask[1, :4] = 0  # left padding
    ref = model(input_ids=ids, attention_mask=mask).logits
    model.set_attn_implementation(packed_attention.register())
    out = model(input_ids=ids, attention_mask=mask).logits
    assert torch.allclose(out[mask.bool()], ref[mask.bool()], atol=1e-10)


def _own_loss(model, examples) -> float:
    """The model's own loss (labels -100 outside the responses), each example alone, token-weighted."""
    from deltatune.data.masking import LossPolicy, policy_weights

    total, targets = 0.0, 0
    for ex in examples:
        ex.weights = policy_weights(ex, LossPolicy("response"))
        labels = [i if w > 0 else -100 for i, w in zip(ex.input_ids, ex.weights)]
        n = sum(label != -100 for label in labels[1:])
        with torch.no_grad():
            total += float(model(torch.tensor([ex.input_ids]), labels=torch.tensor([labels])).loss) * n
        targets += n
    return total / targets


def _first_step_loss(folder, tmp_path, records, **overrides) -> float:
    """The loss `deltatune train` logs for its first step (all records in one packed batch, the mask path)."""
    from deltatune.config import load_config
    from deltatune.train.loop import train

    settings = dict(model=str(folder), output=str(tmp_path / "run"), method="full", lr=1e-3, template="chatml",
                    steps=1, batch_size=4, seq_len=64, precision="fp32", eval_fraction=0.0, warmup_steps=0,
                    log_every=1, attention="mask")  # fmt: skip
    return train(load_config(overrides={**settings, **overrides}), quiet=True, records=records).final_loss


@pytest.mark.parametrize("family", ["cohere", "gemma2"])
def test_training_and_held_out_loss_are_the_models_own_loss(family, tmp_path):
    """The train loop and `heldout_loss` pass the model's logit transform to the chunked loss: the first step
    logs the loss the model itself computes (and Gemma2's eager attention gets an additive packed mask)."""
    from deltatune.data.pipeline import prepare_records
    from deltatune.evaluate.loss import heldout_loss
    from deltatune.models import save_model
    from deltatune.testing import tiny_tokenizer

    tok = tiny_tokenizer()
    model = _causal_lm(family, vocab_size=len(tok))
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(40)  # logits large enough that the scale or cap matters
    folder = save_model(model, tok, tmp_path / "model")
    records = [{"instruction": f"say {w}", "output": f"{w} {w}"} for w in ("one", "two", "three")]
    examples = prepare_records(records, tok, template="chatml").examples
    own = _own_loss(model, examples)
    assert heldout_loss(model, examples, progress=False, flat=False).loss == pytest.approx(own, rel=1e-4)
    assert _first_step_loss(folder, tmp_path, records) == pytest.approx(own, rel=1e-4)


def test_packed_rows_on_the_mask_path_keep_a_sliding_window(tmp_path):
    """Mistral (every layer slides, window 4): the packed rows' block-diagonal mask carries the window, as the
    model's own mask does (transformers uses a 4D mask as given, so examples attended past the window); Gemma2
    (sliding and full layers) gets one mask per layer type."""
    import transformers as tf

    from deltatune.data.pipeline import prepare_records
    from deltatune.errors import ConfigError
    from deltatune.models import save_model
    from deltatune.testing import tiny_tokenizer

    tok = tiny_tokenizer()
    torch.manual_seed(0)
    model = tf.MistralForCausalLM(tf.MistralConfig(**{**COMMON, "vocab_size": len(tok)}, sliding_window=4))
    folder = save_model(model, tok, tmp_path / "mistral")
    records = [{"instruction": f"say {w} twice please", "output": f"{w} {w} and {w}"} for w in ("one", "two", "three")]
    examples = prepare_records(records, tok, template="chatml").examples
    assert min(len(ex) for ex in examples) > 4  # every example is longer than the window
    own = _own_loss(model.eval(), examples)
    assert _first_step_loss(folder, tmp_path, records) == pytest.approx(own, rel=1e-4)

    # Gemma2 mixes sliding and full layers: one mask per layer type (it was refused; packed attention is no way
    # out there, since Gemma2 soft-caps its scores)
    gemma = tf.Gemma2ForCausalLM(tf.Gemma2Config(**{**COMMON, "vocab_size": len(tok)}, head_dim=16, sliding_window=4))
    mixed = save_model(gemma, tok, tmp_path / "gemma2")
    assert _first_step_loss(mixed, tmp_path / "g", records) == pytest.approx(
        _own_loss(gemma.eval(), examples), rel=1e-4
    )
    with pytest.raises(ConfigError, match="attention: packed is not available"):
        _first_step_loss(mixed, tmp_path / "g2", records, attention="packed")


@pytest.mark.parametrize("method", ["prompt", "prefix"])
def test_virtual_tokens_on_a_model_mixing_sliding_and_full_layers(tmp_path, method):
    """Prompt and prefix tuning on Gemma2 (window 4, examples longer): packed rows with a mask per layer type give
    the first step's loss of the same examples padded, each with transformers' own masks."""
    import transformers as tf

    from deltatune.models import save_model
    from deltatune.testing import tiny_tokenizer

    tok = tiny_tokenizer()
    torch.manual_seed(0)
    gemma = tf.Gemma2ForCausalLM(tf.Gemma2Config(**{**COMMON, "vocab_size": len(tok)}, head_dim=16, sliding_window=4))
    folder = save_model(gemma, tok, tmp_path / "gemma2")
    records = [{"instruction": f"say {w} twice please", "output": f"{w} {w} and {w}"} for w in ("one", "two", "three")]
    common = dict(method=method, lr=1e-3, method_options={"num_virtual_tokens": 2})
    packed = _first_step_loss(folder, tmp_path / "p", records, **common)
    padded = _first_step_loss(folder, tmp_path / "u", records, packing=False, **common)
    assert packed == pytest.approx(padded, rel=1e-4)


@pytest.mark.parametrize("family", ["mistral", "gemma2"])
def test_the_trainer_collator_keeps_a_sliding_window_given_the_config(family):
    """DataCollator(packing=True) for transformers' Trainer built a full-attention mask: on Mistral (every layer
    slides) and Gemma2 (sliding and full layers), packed examples longer than the window attended past it. With
    `config=model.config` each packed example's logits equal its run alone."""
    import transformers as tf

    import deltatune
    from deltatune.testing import tiny_tokenizer

    tok = tiny_tokenizer()
    torch.manual_seed(0)
    common = {**COMMON, "vocab_size": len(tok)}
    if family == "mistral":
        model = tf.MistralForCausalLM(tf.MistralConfig(**common, sliding_window=4)).eval()
    else:
        model = tf.Gemma2ForCausalLM(tf.Gemma2Config(**common, head_dim=16, sliding_window=4)).eval()
    records = [{"instruction": f"say {w} twice please", "output": f"{w} {w} and {w}"} for w in ("one", "two", "three")]
    data = deltatune.prepare(records, tok, template="chatml")
    features = [data[i] for i in range(len(data))]
    batch = deltatune.DataCollator(tok, packing=True, max_length=128, config=model.config)(features)
    assert batch["input_ids"].shape[0] == 1  # all three in one row
    with torch.no_grad():
        packed = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                       position_ids=batch["position_ids"]).logits[0]  # fmt: skip
        start = 0
        for f in features:
            n = len(f["input_ids"])
            alone = model(input_ids=torch.tensor([f["input_ids"]])).logits[0]
            assert torch.allclose(packed[start : start + n], alone, atol=1e-5), family
            start += n
