"""`deltatune generate --model M [--adapter A] --prompt "..."` or an interactive chat (no --prompt)."""

from __future__ import annotations

import argparse
import math
import sys


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="answer a prompt, or chat interactively, with a model and optional adapter")
    p.add_argument("--model", default=None, help="model folder, hub id or .gguf (default: SmolLM2-135M-Instruct)")
    p.add_argument("--adapter", default=None, help="adapter folder written by `deltatune train`")
    p.add_argument("--prompt", action="append", default=None, help="prompt (repeatable); omit for interactive chat")
    p.add_argument("--system", default=None, help='system prompt ("" for an empty one, not the template\'s default)')
    p.add_argument("--raw", action="store_true", help="do not wrap the prompt in the chat template")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", default="fp32")
    p.set_defaults(func=run)


def _chat_prompt(tokenizer, history: list[dict]) -> str:
    if tokenizer.chat_template:
        return tokenizer.apply_chat_template(history, tokenize=False, add_generation_prompt=True)
    text = "".join(f"{m['role']}: {m['content']}\n" for m in history)
    return text + "assistant: "


def system_messages(system: str | None) -> list[dict]:
    """The system message: none without --system (the template may add its default), and an empty one for
    --system "" (SmolLM2's template then writes an empty system block instead of its default prompt)."""
    return [] if system is None else [{"role": "system", "content": system}]


def print_answers(answers: list[str]) -> None:
    """One answer as it is; several each under a `==> prompt i of n <==` header (as `head` marks files), so
    multi-line answers can be told apart. Only trailing whitespace goes: leading indentation matters for code."""
    for i, text in enumerate(answers, 1):
        if len(answers) > 1:
            if i > 1:
                print()
            print(f"==> prompt {i} of {len(answers)} <==")
        print(text.rstrip())


def run(args: argparse.Namespace) -> int:
    from deltatune.errors import UserError
    from deltatune.evaluate.generate import GREEDY_BELOW, GenerationConfig, generate
    from deltatune.evaluate.prompts import style_info
    from deltatune.models import load_model, parse_dtype

    if args.max_new_tokens < 1:
        raise UserError(f"must be at least 1, got {args.max_new_tokens}", field="max-new-tokens")
    if not math.isfinite(args.temperature) or args.temperature < 0:  # NaN passed and ran greedy
        raise UserError(f"must be 0 (greedy) or a finite number above it, got {args.temperature}", field="temperature")
    parse_dtype(args.dtype)

    model, tokenizer = load_model(args.model, dtype=args.dtype, adapter=args.adapter)
    sample = args.temperature >= GREEDY_BELOW  # below it, greedy (as `serve` and vLLM decode it)
    # an adapter trained with Alpaca's template: a reply running on into another example is cut there (it went
    # into the chat's history as a turn the user never wrote)
    chat = not args.raw and bool(tokenizer.chat_template)
    gen = GenerationConfig(
        stop=style_info("chat", tokenizer).stop if chat else (),
        max_new_tokens=args.max_new_tokens,
        do_sample=sample,
        temperature=args.temperature if sample else 1.0,
        seed=args.seed,
    )
    system = system_messages(args.system)
    # raw prompts and the plain "user: ..." fallback get the tokenizer's own BOS (as eval's plain prompts); only a
    # chat template writes its own (a base model without a template is the one that needs the BOS)
    bos = args.raw or not tokenizer.chat_template
    if args.prompt:
        prompts = (
            args.prompt
            if args.raw
            else [_chat_prompt(tokenizer, system + [{"role": "user", "content": p}]) for p in args.prompt]
        )
        texts = generate(model, tokenizer, prompts, gen, add_special_tokens=bos, progress=False, warn_truncated=True)
        print_answers(texts)
        return 0
    history = list(system)
    print("interactive chat; an empty line or Ctrl-D ends it", file=sys.stderr)
    while True:
        try:
            line = input("you> ").strip()
        except EOFError:
            break
        if not line:
            break
        history.append({"role": "user", "content": line})
        prompt = _chat_prompt(tokenizer, history)
        texts = generate(model, tokenizer, [prompt], gen, add_special_tokens=bos, progress=False, warn_truncated=True)
        reply = texts[0].strip()
        print(f"model> {reply}")
        history.append({"role": "assistant", "content": reply})
    return 0
