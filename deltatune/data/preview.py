"""Show what a loss policy does to each token: its text, id, segment and weight.

The weight shown is the one training uses: the policy's weight, with an example's first token
at 0 (nothing of the example precedes it; see packing.collate).
"""

from __future__ import annotations

import json
from typing import Any

from deltatune.data.masking import LossPolicy, policy_weights
from deltatune.data.segments import Role, TokenizedExample

# ANSI foreground colours per segment; loss-bearing tokens are bold, the rest dim.
COLOURS = {
    Role.SYSTEM: 35,
    Role.TEMPLATE: 33,
    Role.ROLE: 34,
    Role.INSTRUCTION: 36,
    Role.INPUT: 32,
    Role.RESPONSE: 31,
    Role.CONTEXT: 95,
    Role.SPECIAL: 90,
}


def training_weights(ex: TokenizedExample, policy: LossPolicy) -> list[float]:
    w = policy_weights(ex, policy)
    if w:
        w[0] = 0.0
    return w


def token_rows(ex: TokenizedExample, tokenizer: Any, policy: LossPolicy) -> list[dict]:
    """One dict per token: {"token", "id", "segment", "weight"}; token is its exact text in the example.

    A character split over several byte-level tokens (an emoji, most CJK) is shown once, on the
    first of them; the others show "" (their offsets all cover the same character).
    """
    weights = training_weights(ex, policy)
    rows = []
    shown = 0  # characters of ex.text already shown
    for i, (tid, role, w) in enumerate(zip(ex.input_ids, ex.roles, weights)):
        if ex.offsets is not None and ex.offsets[i][1] > ex.offsets[i][0]:
            a, b = ex.offsets[i]
            text = ex.text[max(a, shown) : b]
            shown = max(shown, b)
        else:
            text = tokenizer.decode([tid])
        rows.append({"token": text, "id": int(tid), "segment": role.value, "weight": float(w)})
    return rows


def to_json(examples: list[TokenizedExample], tokenizer: Any, policy: LossPolicy) -> str:
    return json.dumps([token_rows(ex, tokenizer, policy) for ex in examples], ensure_ascii=False)


def _header(n: int, ex: TokenizedExample, rows: list[dict]) -> str:
    carrying = sum(1 for r in rows if r["weight"] > 0)
    total = sum(r["weight"] for r in rows)
    cut = ", truncated" if ex.truncated else ""
    return f"== example {n} ({ex.source}): {len(rows)} tokens, {carrying} carry loss, total weight {total:g}{cut} =="


def to_text(examples: list[TokenizedExample], tokenizer: Any, policy: LossPolicy, *, colour: bool) -> str:
    """Coloured token stream for a terminal; plain runs of (segment, weight, text) for pipes and files."""
    out = []
    if colour:
        legend = "  ".join(f"\x1b[1;{c}m{r.value}\x1b[0m" for r, c in COLOURS.items())
        out.append(f"policy {policy}: bold = carries loss, dim = weight 0; segments: {legend}")
    else:
        out.append(f"policy {policy}: runs of tokens with the same segment and weight (text as a JSON string)")
    for n, ex in enumerate(examples, start=1):
        rows = token_rows(ex, tokenizer, policy)
        out.append(_header(n, ex, rows))
        if colour:
            parts = []
            for r in rows:
                style = "1" if r["weight"] > 0 else "2"
                if 0 < r["weight"] < 1:
                    style += ";4"  # underlined: a fractional weight
                parts.append(f"\x1b[{style};{COLOURS[Role(r['segment'])]}m{r['token']}\x1b[0m")
            out.append("".join(parts))
        else:
            runs: list[list] = []
            for i, r in enumerate(rows):
                if runs and runs[-1][0] == r["segment"] and runs[-1][1] == r["weight"]:
                    runs[-1][3] = i
                    runs[-1][4] += r["token"]
                else:
                    runs.append([r["segment"], r["weight"], i, i, r["token"]])
            for seg, w, a, b, text in runs:
                span = f"{a}" if a == b else f"{a}-{b}"
                out.append(f"  {span:>9}  {seg:<11} w={w:<5g} {json.dumps(text, ensure_ascii=False)}")
    return "\n".join(out) + "\n"
