"""The ``compose`` commands behind :mod:`compose.cli`'s parser: each takes the parsed arguments and
returns the exit status."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from .data.padding import generation_pad_id


def _named(items: list[str], prefix: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for i, item in enumerate(items):
        name, sep, src = item.partition("=")
        if not sep or "/" in name or not name:
            name, src = (Path(item).stem or f"{prefix}{i}"), item
        out[name] = src
    return out


def _print(*args: Any, **kwargs: Any) -> None:
    from .data import _is_main_process

    if _is_main_process():
        print(*args, **kwargs)


def _cmd_train(args) -> int:
    from .recipe import check_recipe, run_recipe

    recipe = check_recipe(args.recipe, args.overrides)
    if args.dry_run:
        _print(recipe.to_yaml())
        for stage in recipe.stages:
            name = stage.name or "main"
            count = recipe.counts.get(name)
            shown = f" ({count:,} trainable parameters)" if isinstance(count, int) else ""
            _print(f"stage {name}: {stage.config.strategy} on {stage.config.anchor} -> {stage.output_dir}{shown}")
        return 0
    results = run_recipe(recipe, log=print)
    for name, res in results.items():
        _print(f"compose: stage {name} saved to {res['output']}")
    return 0


def _cmd_eval(args) -> int:
    from .evaluate import exact_match, perplexity_report
    from .recipe import load_output

    if not (args.data or args.exact_match or args.lm_eval):
        raise ValueError("nothing to evaluate: give --data, --exact-match or --lm-eval (see compose eval --help)")
    from .guards import check_eval_batch_size

    check_eval_batch_size(args.batch_size)
    composer = load_output(args.dir)
    if args.seq_len is not None:
        composer._check_positions(args.seq_len)
    composer._check_weights("evaluate")
    results: dict[str, Any] = {}
    if args.data:
        results["perplexity"] = perplexity_report(
            composer,
            _named(args.data, "set"),
            batch_size=args.batch_size,
            seq_len=args.seq_len,
            max_batches=args.max_batches,
        )
        for name, rep in results["perplexity"].items():
            bpb = f"  bits/byte {rep['bits_per_byte']:.4f}" if "bits_per_byte" in rep else ""
            _print(
                f"{name}: perplexity {rep['perplexity']:.4f}{bpb}  loss {rep['loss']:.4f}  "
                f"({rep['tokens']} tokens, {rep['documents']} documents)"
            )
    if args.exact_match:
        results["exact_match"] = {}
        for name, src in _named(args.exact_match, "task").items():
            rep = exact_match(composer, src, max_new_tokens=args.max_new_tokens, batch_size=args.batch_size)
            results["exact_match"][name] = {k: v for k, v in rep.items() if k != "predictions"}
            _print(f"{name}: exact match {rep['accuracy']:.4f} ({rep['correct']}/{rep['total']})")
    if args.lm_eval:
        from .harness import lm_eval

        limit = args.limit
        if limit is not None and limit <= 0:
            raise ValueError(f"--limit must be > 0, got {limit:g}")
        scores = lm_eval(
            composer,
            tasks=[t for item in args.lm_eval for t in item.split(",")],
            num_fewshot=args.num_fewshot,
            limit=None if limit is None else int(limit) if limit >= 1 else limit,
            batch_size=args.batch_size,
            include_path=args.include_path or None,
            confirm_run_unsafe_code=args.confirm_run_unsafe_code,
        )
        results["lm_eval"] = dict(scores)
        for task, metrics in scores.items():
            shown = "  ".join(f"{k} {v:.4f}" for k, v in metrics.items() if not k.endswith("_stderr"))
            _print(f"{task}: {shown}")
    if args.json:
        from .data import _is_main_process

        if _is_main_process():
            Path(args.json).parent.mkdir(parents=True, exist_ok=True)
            Path(args.json).write_text(json.dumps(results, indent=2, sort_keys=True) + "\n")
    return 0


def _cmd_generate(args) -> int:
    import torch

    from .recipe import load_output

    composer = load_output(args.dir)
    tok = composer.tokenizer
    if tok is None:
        raise ValueError(f"{args.dir} has no tokenizer (and its anchor has none): cannot encode text prompts")
    torch.manual_seed(args.seed)
    pad = generation_pad_id(tok, getattr(composer.model, "config", None))

    for prompt in args.prompt:
        enc = _chat_encoding(tok, prompt, args) if args.chat else tok(prompt, return_tensors="pt")
        kwargs: dict[str, Any] = {"max_new_tokens": args.max_new_tokens, "do_sample": args.sample}
        if args.chat:
            from .chat import stop_token_ids

            kwargs["eos_token_id"] = stop_token_ids(tok)
        if args.sample:
            kwargs.update(temperature=args.temperature, top_p=args.top_p)
        out = composer.generate(enc["input_ids"], attention_mask=enc["attention_mask"], pad_token_id=pad, **kwargs)
        text = tok.decode(out[0, enc["input_ids"].shape[1] :], skip_special_tokens=True)
        _print(text if args.chat else prompt + text)
    return 0


def _chat_encoding(tok, prompt: str, args) -> dict:
    """The conversation (``--system``, then the prompt as the user's message) up to the assistant's turn."""
    import torch

    from .chat import chat_prompt

    messages = ([{"role": "system", "content": args.system}] if args.system else []) + [
        {"role": "user", "content": prompt}
    ]
    ids = torch.tensor([chat_prompt(tok, messages, args.chat_template)])
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def _cmd_check(args) -> int:
    from .recipe import check_recipe

    failed = 0
    for path in args.recipes:
        try:
            recipe = check_recipe(path, args.set)
        except Exception as e:  # noqa: BLE001 - every failure is reported, then the exit status says so
            failed += 1
            print(f"FAIL {e}" if str(path) in str(e) else f"FAIL {path}: {e}", file=sys.stderr)
            continue
        stages = ", ".join(f"{s.name or 'main'}:{s.config.strategy}" for s in recipe.stages)
        _print(f"ok   {path} ({stages})")
        for name, count in recipe.counts.items():
            shown = f"{count:,} trainable parameters" if isinstance(count, int) else count
            _print(f"     {name}: {shown}")
    return 1 if failed else 0


def _cmd_export(args) -> int:
    from .export import export_plain
    from .recipe import load_output

    composer = load_output(args.dir)
    size = int(args.max_shard_size) if args.max_shard_size and args.max_shard_size.isdigit() else args.max_shard_size
    out = export_plain(composer, args.out, source_dir=args.dir, overwrite=args.overwrite, max_shard_size=size)
    _print(f"compose: exported {composer.strategy_name} model to {out}")
    return 0


def _cmd_import_gguf(args) -> int:
    from .gguf import import_gguf

    out = import_gguf(args.file, args.out, dtype=args.dtype, overwrite=args.overwrite)
    _print(f"compose: wrote {out} (load it with Composer({str(out)!r}, ...) or AutoModelForCausalLM)")
    return 0


def _cmd_push(args) -> int:
    from .publish import push_to_hub

    url = push_to_hub(
        args.dir, args.repo, private=args.private or None, revision=args.revision,
        commit_message=args.commit_message, create_pr=args.create_pr,
    )  # fmt: skip
    _print(f"compose: pushed {args.dir} to {args.repo}: {url}")
    return 0
