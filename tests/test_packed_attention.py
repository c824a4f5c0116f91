"""Packed attention computed example by example equals the 4D block-diagonal mask path, and
therefore each example's solo run (the data tests pin the mask path to solo runs)."""

import pytest
import torch

from deltatune.data.masking import LossPolicy
from deltatune.data.packing import collate, pack_examples
from deltatune.data.pipeline import prepare_records
from deltatune.testing import tiny_model, tiny_tokenizer
from deltatune.train import packed_attention


def _packed_batch(tok, seq_len=96):
    records = [
        {"instruction": f"What is {a} + {b}?" * (1 + a % 3), "output": f"The answer is {a + b}."}
        for a in range(4)
        for b in range(3)
    ]
    examples = prepare_records(records, tok, template="chatml", max_len=seq_len).examples
    rows = pack_examples(examples, seq_len)
    return collate(
        rows[:3], LossPolicy("response"), seq_len=seq_len, pad_id=tok.pad_token_id, packed=True, template_name="chatml"
    )


def test_spans_follow_position_resets():
    pos = torch.tensor([[0, 1, 2, 0, 1, 0], [0, 1, 2, 3, 4, 5]])
    assert packed_attention.spans_from_position_ids(pos) == [[(0, 3), (3, 5), (5, 6)], [(0, 6)]]


def test_packed_attention_equals_block_diagonal_mask_in_value_and_gradient():
    tok = tiny_tokenizer()
    model = tiny_model().double()  # float64: any difference is a bug, not rounding
    batch = _packed_batch(tok)
    assert max(len(s) for s in packed_attention.spans_from_position_ids(batch["position_ids"])) > 1
    decoder = model.get_decoder()
    ref = decoder(
        input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], position_ids=batch["position_ids"]
    ).last_hidden_state
    alone = batch["attention_mask"][:, 0].sum(-1) == 1
    keep = ~(alone & (batch["position_ids"] > 0))
    ref[keep].pow(2).sum().backward()
    ref_grad = model.model.layers[0].self_attn.q_proj.weight.grad.clone()
    model.zero_grad()
    model.set_attn_implementation(packed_attention.register())
    ours = decoder(
        input_ids=batch["input_ids"],
        attention_mask=None,
        position_ids=batch["position_ids"],
        packed_spans=packed_attention.spans_from_position_ids(batch["position_ids"]),
    ).last_hidden_state
    ours[keep].pow(2).sum().backward()
    # row padding attends to itself alone under the mask, causally within the padding here; it carries
    # no loss and no example sees it, so compare every other position
    alone = batch["attention_mask"][:, 0].sum(-1) == 1
    padding = alone & (batch["position_ids"] > 0)
    assert padding.any() and (~padding).sum() > 100
    assert torch.allclose(ours[~padding], ref[~padding], atol=1e-10)
    assert torch.allclose(model.model.layers[0].self_attn.q_proj.weight.grad, ref_grad, atol=1e-10)


def test_without_spans_it_is_plain_sdpa():
    tok = tiny_tokenizer()
    model = tiny_model()
    ids = torch.tensor([tok("What is 2 + 3?")["input_ids"]])
    ref = model(input_ids=ids).logits
    model.set_attn_implementation(packed_attention.register())
    assert torch.equal(model(input_ids=ids).logits, ref)


def _reference(q, k, v, spans):
    """Per-span causal SDPA in float64 (PyTorch's own kernel, GQA by repeating the key/value heads)."""
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
    parts = [
        torch.nn.functional.scaled_dot_product_attention(q[:, :, s:e], k[:, :, s:e], v[:, :, s:e], is_causal=True)
        for s, e in spans[0]
    ]
    return torch.cat(parts, 2).transpose(1, 2)  # [1, T, H, D]


def _qkv(lengths, heads=6, kv_heads=2, dim=16, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    total = sum(lengths)
    # transformers hands over [B, H, T, D] views of [B, T, H, D] projections: the same strides here
    q, k, v = (
        torch.randn(1, total, h, dim, generator=g, dtype=torch.float64).to(dtype).transpose(1, 2)
        for h in (heads, kv_heads, kv_heads)
    )
    starts = [sum(lengths[:i]) for i in range(len(lengths))]
    return q, k, v, [[(s, s + n) for s, n in zip(starts, lengths)]]


def _value_and_grads(fn, q, k, v, grad_out):
    q, k, v = (x.detach().requires_grad_() for x in (q, k, v))
    out = fn(q, k, v)
    out.backward(grad_out)
    return [out.detach(), q.grad, k.grad, v.grad]


# (WHOLE_SPAN, QUERY_BLOCK): every span whole; long spans in 32-row query blocks (the 70-token one in three,
# its last block part padding); every span of more than one tile in blocks
BLOCKS = [(10**9, 32), (32, 32), (0, 64)]


@pytest.fixture(
    params=[(*b, keep) for b in BLOCKS for keep in (0, 256)],
    ids=lambda b: f"whole{min(b[0], 999)}-block{b[1]}-keep{b[2]}",
)
def query_blocks(request, monkeypatch):
    whole, block, keep = request.param
    monkeypatch.setattr(packed_attention, "WHOLE_SPAN", whole)
    monkeypatch.setattr(packed_attention, "QUERY_BLOCK", block)
    monkeypatch.setattr(packed_attention, "KEEP_PROBABILITIES", keep)


def _kept_against_recomputed(monkeypatch, lengths: list[int], seed: int) -> tuple[int, int]:
    """SpanAttention's numbers saved for backward with KEEP_PROBABILITIES 0 and 256 (recomputing and keeping), after
    checking that the two give bitwise the same outputs and gradients in bf16 (the same kernels on the same
    inputs)."""
    q, k, v, spans = _qkv(lengths, heads=9, kv_heads=3, dim=64, dtype=torch.bfloat16, seed=seed)
    grad_out = torch.randn(1, sum(lengths), 9, 64, dtype=torch.bfloat16, generator=torch.Generator().manual_seed(seed))

    def run(keep: int):
        monkeypatch.setattr(packed_attention, "KEEP_PROBABILITIES", keep)
        saved: list[int] = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
            result = _value_and_grads(
                lambda *x: packed_attention.span_attention(*x, spans, 64**-0.5), q, k, v, grad_out
            )
        return result, sum(saved)

    (recomputed, saved_without), (kept, saved_with) = run(0), run(256)
    for name, a, b in zip(["out", "dq", "dk", "dv"], recomputed, kept):
        assert torch.equal(a, b), name
    return saved_without, saved_with


def test_kept_probabilities_give_bitwise_the_same_gradients_and_are_saved(monkeypatch):
    """Spans up to KEEP_PROBABILITIES rows save their probabilities instead of recomputing them in backward:
    [H, m, m] more numbers saved for each kept span (m: its length tiled to 32), nothing more for the span longer
    than the limit; with a span not kept in the call, no tiles are kept beside q, k and v (they cost up to 60% more
    saved memory)."""
    lengths = [37, 120, 64, 90, 300]
    saved_without, saved_with = _kept_against_recomputed(monkeypatch, lengths, seed=3)
    tiled = [-(-n // 32) * 32 for n in lengths if n <= 256]
    assert saved_with - saved_without == sum(9 * m * m for m in tiled)


def test_where_every_span_keeps_its_tiles_they_replace_the_inputs(monkeypatch):
    """Spans all kept: q, k and v themselves are not saved (the tiles hold them, scaled and padded to 32 rows)."""
    lengths = [37, 120, 64, 90]
    saved_without, saved_with = _kept_against_recomputed(monkeypatch, lengths, seed=4)
    tiled = [-(-n // 32) * 32 for n in lengths]
    assert saved_without == (9 + 2 * 3) * sum(lengths) * 64
    assert saved_with == sum(9 * m * m + (9 + 2 * 3) * m * 64 for m in tiled)


def test_query_blocks_cover_the_tiled_span(monkeypatch):
    monkeypatch.setattr(packed_attention, "WHOLE_SPAN", 256)
    monkeypatch.setattr(packed_attention, "QUERY_BLOCK", 128)
    assert packed_attention._query_blocks(256) == [(0, 256)]
    assert packed_attention._query_blocks(288) == [(0, 128), (128, 256), (256, 288)]


def test_span_attention_equals_per_example_sdpa_in_float64(query_blocks):
    lengths = [7, 1, 30, 12, 2, 70, 33]  # a one-token example included
    q, k, v, spans = _qkv(lengths)
    grad_out = torch.randn(1, sum(lengths), 6, 16, dtype=torch.float64)
    ours = _value_and_grads(lambda *x: packed_attention.span_attention(*x, spans, 16**-0.5), q, k, v, grad_out)
    ref = _value_and_grads(lambda *x: _reference(*x, spans), q, k, v, grad_out)
    for name, a, b in zip(["out", "dq", "dk", "dv"], ours, ref):
        assert torch.allclose(a, b, atol=1e-12), name
    # the check can fail: one causal attention over the whole row differs
    whole = _reference(q, k, v, [[(0, sum(lengths))]])
    assert (whole - ref[0]).abs().max() > 1e-2


def test_span_attention_in_bf16_is_as_close_to_float64_as_sdpa(query_blocks):
    lengths = [37, 120, 64, 90, 300]
    q, k, v, spans = _qkv(lengths, heads=9, kv_heads=3, dim=64, dtype=torch.bfloat16, seed=1)
    # seeded: the ratio of two bf16 errors' maxima moves with the inputs (up to 2.2 over 12 seeds), so an input that
    # depended on the tests run before this one made it pass or fail by the order
    grad_out = torch.randn(1, sum(lengths), 9, 64, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    exact = _value_and_grads(lambda *x: _reference(*x, spans), *(x.double() for x in (q, k, v)), grad_out)
    ours = _value_and_grads(
        lambda *x: packed_attention.span_attention(*x, spans, 64**-0.5), q, k, v, grad_out.bfloat16()
    )
    sdpa = _value_and_grads(lambda *x: _reference(*x, spans), q, k, v, grad_out.bfloat16())
    for name, a, b, e in zip(["out", "dq", "dk", "dv"], ours, sdpa, exact):
        err_ours, err_sdpa = (a.double() - e).abs().max(), (b.double() - e).abs().max()
        assert err_ours <= 2 * err_sdpa + 1e-3, (name, err_ours, err_sdpa)


def test_workspace_is_reused_and_released():
    q, k, v, spans = _qkv([20, 9])
    packed_attention.span_attention(q, k, v, spans, 0.25)
    buffers = {key: buf.data_ptr() for key, buf in packed_attention.workspace.buffers.items()}
    q, k, v, spans = _qkv([5, 17, 3], seed=2)  # smaller spans: the same buffers
    packed_attention.span_attention(q, k, v, spans, 0.25)
    assert {key: buf.data_ptr() for key, buf in packed_attention.workspace.buffers.items()} == buffers
    packed_attention.workspace.release()
    assert not packed_attention.workspace.buffers


def _varlen_contract(calls):
    """A float64 stand-in for PyTorch's `varlen_attn` (CUDA-only), written from its documented contract:
    query [Tq, Hq, D], key/value [Tk, Hkv, D], int32 cumulative offsets, the longest sequence, window (-1, 0)
    for causal attention, grouped-query heads with enable_gqa. It records each call's arguments."""

    def varlen_attn(
        query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, scale=None, window_size=(-1, -1), enable_gqa=False
    ):
        calls.append(
            {
                "offsets": cu_seq_q.tolist(),
                "max": (max_q, max_k),
                "window": window_size,
                "gqa": enable_gqa,
                "dtype": cu_seq_q.dtype,
                "same_offsets": cu_seq_k is cu_seq_q,
            }
        )
        assert window_size == (-1, 0) and query.shape[1] % key.shape[1] == 0
        bounds = cu_seq_q.tolist()
        assert (
            bounds[0] == 0 and bounds[-1] == query.shape[0] and max(b - a for a, b in zip(bounds, bounds[1:])) == max_q
        )
        parts = [
            torch.nn.functional.scaled_dot_product_attention(
                query[a:b].transpose(0, 1),
                key[a:b].transpose(0, 1),
                value[a:b].transpose(0, 1),
                is_causal=True,
                scale=scale,
                enable_gqa=enable_gqa,
            ).transpose(0, 1)
            for a, b in zip(bounds, bounds[1:])
        ]
        return torch.cat(parts)

    return varlen_attn


def test_varlen_path_equals_span_attention_in_float64(monkeypatch):
    """The CUDA path's glue (rows laid end to end, offsets, layouts, grouped heads, scale), checked on the CPU
    against the span kernel through a stand-in that keeps varlen_attn's contract: two rows of different spans."""
    calls = []
    monkeypatch.setattr(packed_attention, "_varlen_attn", _varlen_contract(calls))
    rows = [[3, 4, 3], [6, 4]]
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 10, h, 16, generator=g, dtype=torch.float64).transpose(1, 2) for h in (6, 2, 2))
    spans = [[(sum(r[:i]), sum(r[: i + 1])) for i in range(len(r))] for r in rows]
    grad_out = torch.randn(2, 10, 6, 16, generator=g, dtype=torch.float64)
    scale = 0.3  # not the default 16**-0.5: the scale must be passed on
    ours = _value_and_grads(lambda *x: packed_attention.varlen_attention(*x, spans, scale), q, k, v, grad_out)
    ref = _value_and_grads(lambda *x: packed_attention.span_attention(*x, spans, scale), q, k, v, grad_out)
    for name, a, b in zip(["out", "dq", "dk", "dv"], ours, ref):
        assert torch.allclose(a, b, atol=1e-12), name
    assert calls == [
        {
            "offsets": [0, 3, 7, 10, 16, 20],
            "max": (6, 6),
            "window": (-1, 0),
            "gqa": True,
            "dtype": torch.int32,
            "same_offsets": True,
        }
    ]


def test_varlen_path_on_torch_2_9s_api(monkeypatch):
    """torch 2.9's varlen_attn takes is_causal, no scale (its own is head_dim**-0.5) and no enable_gqa: the
    scale goes into the queries and the key/value heads are repeated."""
    calls = []
    current = _varlen_contract(calls)

    def varlen_attn(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, is_causal=False, return_aux=None):
        assert is_causal and key.shape[1] == query.shape[1] and return_aux is None
        return current(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, window_size=(-1, 0))

    monkeypatch.setattr(packed_attention, "_varlen_attn", varlen_attn)
    q, k, v, spans = _qkv([7, 30, 12])
    grad_out = torch.randn(1, 49, 6, 16, dtype=torch.float64)
    for scale in (0.3, 16**-0.5):
        ours = _value_and_grads(lambda *x: packed_attention.varlen_attention(*x, spans, scale), q, k, v, grad_out)
        ref = _value_and_grads(lambda *x: packed_attention.span_attention(*x, spans, scale), q, k, v, grad_out)
        for name, a, b in zip(["out", "dq", "dk", "dv"], ours, ref):
            assert torch.allclose(a, b, atol=1e-12), (scale, name)
    assert [c["gqa"] for c in calls] == [False, False]


def test_offsets_go_to_the_device_once_a_batch(monkeypatch):
    """Every layer of a forward gets the same spans: one offsets tensor for all of them, a new one for a new
    batch."""
    calls = []
    monkeypatch.setattr(packed_attention, "_varlen_attn", _varlen_contract(calls))
    made = []
    tensor = torch.tensor
    monkeypatch.setattr(packed_attention.torch, "tensor", lambda *a, **k: made.append(a) or tensor(*a, **k))
    q, k, v, spans = _qkv([5, 9])
    for _ in range(3):  # three layers
        packed_attention.varlen_attention(q, k, v, spans, 0.25)
    _, _, _, other = _qkv([5, 9])  # the next batch: equal spans, another object
    packed_attention.varlen_attention(q, k, v, other, 0.25)
    assert made == [([0, 5, 14],), ([0, 5, 14],)] and len(calls) == 4


def test_span_attention_takes_varlen_only_where_it_runs(monkeypatch):
    calls = []
    monkeypatch.setattr(packed_attention, "_varlen_attn", _varlen_contract(calls))
    q, k, v, spans = _qkv([5, 9], dtype=torch.bfloat16)
    assert not packed_attention.varlen_usable(q)  # a CPU tensor: the span kernel
    packed_attention.span_attention(q, k, v, spans, 0.25)
    assert not calls
    monkeypatch.setattr(packed_attention, "varlen_usable", lambda query: True)  # as on a CUDA device
    packed_attention.span_attention(q.double(), k.double(), v.double(), spans, 0.25)
    assert [c["offsets"] for c in calls] == [[0, 5, 14]]


def test_span_attention_refuses_a_double_backward():
    # its backward writes into buffers (out=): with every span keeping its tiles, a gradient of the gradient came
    # back without the attention's second-order term, silently
    q, k, v, spans = _qkv([20, 30], heads=4, kv_heads=2, dim=8, dtype=torch.float64, seed=5)
    q, k, v = (x.detach().requires_grad_() for x in (q, k, v))
    out = packed_attention.span_attention(q, k, v, spans, 8**-0.5)
    (grad_q,) = torch.autograd.grad(out.square().sum(), q, create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable|twice"):
        grad_q.sum().backward()
