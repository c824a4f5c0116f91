"""Dataset statistics that decide a loss policy: lengths, the instruction/response ratio, truncation,
padding waste, and advice grounded in the Instruction Modelling paper (arXiv 2405.14394).

The paper finds two factors: instruction modelling (loss on the instruction too) helps most when
instructions are long relative to responses, and when examples are few. Its Table 1 (LLaMA-2-7B,
IT -> IM) is kept below so the advice can quote the nearest dataset in numbers.
"""

from __future__ import annotations

import math
import statistics
from collections import Counter
from dataclasses import dataclass
from typing import Sequence

from deltatune.data.masking import TEMPLATE_ROLES, LossPolicy
from deltatune.data.packing import padding_waste
from deltatune.data.segments import Role, TokenizedExample


@dataclass(frozen=True)
class PaperPoint:
    name: str
    ratio: float  # mean instruction length / mean output length
    examples: int
    alpaca_eval: tuple[float, float]  # AlpacaEval 1.0, IT -> IM
    nlp_mean: tuple[float, float]  # mean of 18 NLP tasks, IT -> IM


PAPER = [
    PaperPoint("MMLU-Chat", 26.33, 13533, (4.42, 9.78), (47.18, 47.84)),
    PaperPoint("Tydiqa", 5.86, 13533, (5.12, 10.10), (48.21, 48.70)),
    PaperPoint("BBH-ICL", 3.27, 13533, (36.20, 44.15), (48.28, 49.15)),
    PaperPoint("Dolly 3k", 0.64, 2996, (13.42, 15.11), (46.58, 48.95)),
    PaperPoint("Alpaca 5k", 0.57, 5305, (16.29, 19.52), (45.29, 47.47)),
    PaperPoint("Dolly 9k", 0.30, 9229, (21.54, 30.77), (45.54, 48.00)),
    PaperPoint("LIMA", 0.09, 1030, (33.06, 32.94), (48.79, 49.60)),
]
INSTRUCTION_ROLES = (Role.INSTRUCTION, Role.INPUT, Role.CONTEXT)  # excluded assistant messages are prompt
BOILERPLATE_ROLES = TEMPLATE_ROLES  # the tokens the weighted policy's template=λ_t weights
LAMBDA_RANGE = "0.01–0.5"  # the prompt-loss-weight study's best λ for short completions (methods.md section 7)
# The paper's size finding holds on Tulu V2 subsets at a ratio near 10; BBH (3.27) still gained strongly, LIMA
# (0.09) not at all: below this ratio the size is not evidence for loss on instructions.
SIZE_FINDING_MIN_RATIO = 3.0


def distribution(values: Sequence[float]) -> dict:
    if not values:
        return {"min": 0, "median": 0, "p90": 0, "max": 0, "mean": 0.0}
    s = sorted(values)
    p90 = s[min(len(s) - 1, math.ceil(0.9 * len(s)) - 1)]  # nearest-rank percentile
    return {"min": s[0], "median": statistics.median(s), "p90": p90, "max": s[-1], "mean": sum(s) / len(s)}


def dataset_stats(
    examples: Sequence[TokenizedExample], *, max_len: int, seq_len: int, batch_size: int, overflow: str = "truncate"
) -> dict:
    """Statistics of untruncated examples; truncation and padding are computed as if at `max_len`. Padding waste
    counts the examples training would keep: cut to `max_len` (`overflow: truncate`, those that keep a response
    token) or the ones that fit (`overflow: drop`)."""
    counts = [Counter(ex.roles) for ex in examples]
    total = [len(ex) for ex in examples]
    instr = [sum(c[r] for r in INSTRUCTION_ROLES) for c in counts]
    resp = [c[Role.RESPONSE] for c in counts]
    system = [c[Role.SYSTEM] for c in counts]
    boiler = [sum(c[r] for r in BOILERPLATE_ROLES) for c in counts]
    n = len(examples)
    mean_i = sum(instr) / n if n else 0.0
    mean_r = sum(resp) / n if n else 0.0
    over = [ex for ex in examples if len(ex) > max_len]
    # a truncated example loses all its loss-bearing response when nothing of it fits
    lose_response = sum(1 for ex in over if Role.RESPONSE not in ex.roles[:max_len])
    if overflow == "drop":
        trained = [ex for ex in examples if len(ex) <= max_len]
    else:
        trained = [c for c in (_clip(ex, max_len) for ex in examples) if Role.RESPONSE in c.roles]
    waste = padding_waste(trained, seq_len, batch_size) if trained else {}
    share = policy_shares(trained)
    return {
        "examples": n,
        "tokens": {
            "total": distribution(total),
            "instruction": distribution(instr),
            "response": distribution(resp),
            "system": distribution(system),
            "boilerplate": distribution(boiler),
        },
        "ratio_instruction_to_response": mean_i / mean_r if mean_r else float("inf"),
        "median_example_ratio": statistics.median([i / r for i, r in zip(instr, resp) if r]) if n else 0.0,
        "max_len": max_len,
        "would_truncate": len(over),
        "would_lose_whole_response": lose_response,
        "overflow": overflow,
        "examples_trained": len(trained),
        "seq_len": seq_len,
        "batch_size": batch_size,
        "padding": waste,
        "policies": share,
    }


def policy_shares(trained: Sequence[TokenizedExample]) -> dict:
    """Loss weight per example, and its share on boilerplate, for each policy, over the examples training keeps
    (cut as training cuts them) and without each example's first token: nothing precedes it, so training
    always gives it weight 0 (packing.collate)."""
    role_totals: Counter = sum((Counter(ex.roles[1:]) for ex in trained), Counter())
    n = len(trained)
    share = {}
    for name in ("response", "instruction", "no-boilerplate", "all", "weighted"):
        table = LossPolicy(name).role_weights()  # turns="all": a token's weight depends on its role only
        wsum = sum(table[r] * k for r, k in role_totals.items())
        bsum = sum(table[r] * role_totals[r] for r in BOILERPLATE_ROLES)
        share[name] = {
            "loss_weight_per_example": wsum / n if n else 0.0,
            "boilerplate_share": bsum / wsum if wsum else 0.0,
        }
    return share


def _clip(ex: TokenizedExample, max_len: int) -> TokenizedExample:
    if len(ex) <= max_len:
        return ex
    return TokenizedExample(ex.input_ids[:max_len], ex.roles[:max_len], ex.turns[:max_len], source=ex.source)


def nearest_paper_point(ratio: float) -> PaperPoint:
    return min(PAPER, key=lambda p: abs(math.log(max(ratio, 1e-6)) - math.log(p.ratio)))


def advise(stats: dict, template: str) -> list[str]:
    """Policy advice, each line with the numbers behind it."""
    r = stats["ratio_instruction_to_response"]
    n = stats["examples"]
    near = nearest_paper_point(r)
    ae, nlp = near.alpaca_eval, near.nlp_mean
    lines = [
        f"Instruction/response length ratio {r:.2f} (mean instruction {stats['tokens']['instruction']['mean']:.1f} "
        f"tokens / mean response {stats['tokens']['response']['mean']:.1f}); nearest in the paper: {near.name} "
        f"(ratio {near.ratio}), where loss on instructions moved AlpacaEval 1.0 {ae[0]} -> {ae[1]} "
        f"({ae[1] - ae[0]:+.2f}) and the 18-task NLP mean {nlp[0]} -> {nlp[1]} ({nlp[1] - nlp[0]:+.2f})."
    ]
    lines.append(ratio_advice(r, n))
    lines.append(size_advice(r, stats.get("examples_trained", n)))  # the examples --max-len and --overflow leave
    im = stats["policies"]["instruction"]
    if im["boilerplate_share"] >= 0.1:
        lines.append(
            f"With template '{template}', {100 * im['boilerplate_share']:.0f}% of the instruction policy's loss "
            "falls on constant template text, identical in every example: --policy no-boilerplate trains "
            "only on instruction, input and response."
        )
    if stats["would_truncate"]:
        lines.append(
            f"{stats['would_truncate']} examples exceed --max-len {stats['max_len']} "
            + (
                "(--overflow drop drops them all)."
                if stats.get("overflow") == "drop"
                else f"({stats['would_lose_whole_response']} would lose their whole response and be dropped)."
            )
        )
    pad = stats["padding"]
    if pad:
        lines.append(
            f"Packing wastes {100 * pad['packed_waste']:.1f}% of positions on padding vs "
            f"{100 * pad['padded_waste']:.1f}% for batches of {stats['batch_size']} padded to their longest."
        )
    from deltatune.experiments.recorded import masking_advice

    lines.append(masking_advice(r, n))  # the project's own measurement beside the paper's
    return lines


def _measured_worse(ratio: float, examples: int) -> str | None:
    """The project's recorded masking run nearest to this ratio and size (as `masking_advice` picks it), named,
    when instruction loss did worse there beyond the seed spread; else None (none recorded, or no difference)."""
    from deltatune.experiments.recorded import nearest_masking_run

    near = nearest_masking_run(ratio, examples)
    if near is None or near.result is None:
        return None
    worse = near.result["loss_diff"] > near.result["loss_diff_spread"]
    return f"{near.dataset}, ratio {near.ratio:.2f}" if worse else None


def ratio_advice(r: float, n: int) -> str:
    """The policy the length ratio suggests. Long instructions: the paper's full instruction loss (λ = 1) gained
    there with long training of a 7B model, the prompt-loss-weight study found a small λ best for short
    completions, and this project's short LoRA run found λ = 1 worse: a small λ is what all three support."""
    if r >= 1.0:
        measured = _measured_worse(r, n)
        own = (
            f"This project's own run nearest this data ({measured}; last line) found full instruction loss worse "
            "than response-only (a short run leaves the short response under-trained when the instruction shares "
            "the loss) and weighted:0.1 no worse (docs/experiments.md). "
            if measured
            else ""
        )
        return (
            "Instructions are longer than responses: the regime where the paper's instruction modelling gained most "
            "(MMLU-Chat 26.3: AlpacaEval 4.42 -> 9.78; BBH 3.27: 36.20 -> 44.15; LLaMA-2-7B, about 2 epochs). "
            + own
            + f"Recommended: --policy weighted:λ with λ in {LAMBDA_RANGE} (the prompt-loss-weight study's best "
            "for short completions); try --policy instruction (λ = 1, the paper's) against response on held-out "
            "data, with long training on a small set."
        )
    if r >= 0.2:
        return (
            "Instructions are shorter than responses but not negligible: instruction modelling still helped at "
            "these ratios (Alpaca 5k 0.57: +3.23 AlpacaEval; Dolly 9k 0.30: +9.23). Recommended: --policy "
            "instruction, and compare with response on a held-out set."
        )
    return (
        "Responses dominate (as in LIMA, ratio 0.09, where instruction modelling gave no AlpacaEval gain: "
        "33.06 -> 32.94): the instruction adds little signal. Recommended: --policy response."
    )


def size_advice(r: float, n: int) -> str:
    """What the dataset's size adds. The paper measured the size effect only on Tulu V2 subsets at a ratio near
    10; LIMA, small but with a ratio of 0.09, got no gain, so the size speaks only where instructions are long."""
    long_instructions = r >= SIZE_FINDING_MIN_RATIO
    if n <= 10_000:
        if long_instructions:
            return (
                f"{n} examples: a small dataset. At a fixed ratio near 10 the paper's gain from instruction "
                "modelling grew as Tulu V2 subsets shrank from 35K to 1K examples (less overfitting to responses), "
                "so with instructions this long the size favours some weight on the instruction."
            )
        return (
            f"{n} examples: a small dataset, but the paper's finding that small sets gain more was measured at a "
            f"ratio near 10 (Tulu V2 subsets, 35K to 1K), not at {r:.2f}; LIMA, small (1,030) with a ratio of "
            "0.09, got no gain: the size does not favour loss on instructions here."
        )
    if n > 35_000:
        return (
            f"{n} examples: more than the 35K where the paper's instruction-modelling gain (at a ratio near 10) "
            "had shrunk; expect a smaller gain than the ratio alone suggests."
        )
    if long_instructions:
        return f"{n} examples: between the paper's 10K and 35K subsets at a ratio near 10; a moderate gain is likely."
    return (
        f"{n} examples: between the paper's 10K and 35K subsets, but those were at a ratio near 10, not {r:.2f}; "
        "the size says little here."
    )


def format_stats(stats: dict, report_summary: str, template: str) -> str:
    t = stats["tokens"]
    lines = [
        f"records (read whole, before --max-len): {report_summary}",
        f"examples: {stats['examples']}",
        "",
        f"{'tokens':<12} {'min':>7} {'median':>8} {'p90':>7} {'max':>7} {'mean':>8}",
    ]
    for key in ("total", "instruction", "response", "system", "boilerplate"):
        d = t[key]
        lines.append(f"{key:<12} {d['min']:>7} {d['median']:>8g} {d['p90']:>7} {d['max']:>7} {d['mean']:>8.1f}")
    lines += [
        "",
        f"instruction/response ratio (of means): {stats['ratio_instruction_to_response']:.2f}; "
        f"median per-example ratio: {stats['median_example_ratio']:.2f}",
        f"longer than --max-len {stats['max_len']}: {stats['would_truncate']} "
        f"(of which {stats['would_lose_whole_response']} lose their whole response)",
    ]
    pad = stats["padding"]
    if pad:
        lines.append(
            f"padding waste at seq_len {stats['seq_len']} over the {stats['examples_trained']} examples "
            f"training keeps: packed {100 * pad['packed_waste']:.1f}% "
            f"({pad['packed_rows']} rows) vs padded {100 * pad['padded_waste']:.1f}% "
            f"({pad['padded_batches']} batches of {stats['batch_size']})"
        )
    lines += ["", f"{'policy':<15} {'loss weight/example':>20} {'on boilerplate':>15}"]
    for name, s in stats["policies"].items():
        label = "weighted:0.1" if name == "weighted" else name
        lines.append(f"{label:<15} {s['loss_weight_per_example']:>20.1f} {100 * s['boilerplate_share']:>14.1f}%")
    lines += ["", "advice:"] + [f"- {line}" for line in advise(stats, template)]
    return "\n".join(lines) + "\n"
