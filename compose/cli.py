"""The ``compose`` command: train from a recipe, evaluate, generate, validate recipes, export.

::

    compose train recipes/tiny/block_expand.yaml train.max_steps=20
    compose eval runs/tiny/block_expand/sft/final --data recipes/tiny/data/general.txt
    compose generate runs/tiny/block_expand/sft/final --prompt "def f(x):"
    compose check recipes/**/*.yaml
    compose export runs/lora/final merged/ --max-shard-size 5GB
    compose push runs/tiny/block_expand/sft/final my-name/my-model
    compose import-gguf SmolLM2-135M-Instruct.Q4_1.gguf smollm2/

Works the same under ``accelerate launch -m compose.cli train RECIPE ...``: every process
runs the recipe (training is distributed by accelerate); only the main process writes
files, and printing is the only main-process-only action.
"""

from __future__ import annotations

import argparse
import ast
import inspect
import json
import sys
import textwrap
from pathlib import Path
from typing import Any

__all__ = ["main", "build_parser"]


def _attribute_docs(cls: type) -> dict[str, str]:
    """``{field: docstring}`` from the string literals that follow a dataclass's fields."""
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    except (OSError, TypeError):
        return {}
    docs: dict[str, str] = {}
    body = tree.body[0].body if tree.body and isinstance(tree.body[0], ast.ClassDef) else []
    for node, nxt in zip(body, body[1:]):
        if (
            isinstance(node, ast.AnnAssign)
            and isinstance(node.target, ast.Name)
            and isinstance(nxt, ast.Expr)
            and isinstance(getattr(nxt, "value", None), ast.Constant)
            and isinstance(nxt.value.value, str)
        ):
            docs[node.target.id] = " ".join(nxt.value.value.split())
    return docs


def _recipe_keys_help() -> str:
    import dataclasses

    from . import recipe as r
    from .train import TrainConfig

    lines = ["recipe keys (override any with key=value; see docs/guide.md):"]
    sections = [
        ("", r.RecipeSchema, r.RecipeSchema),
        ("data.", r.DataSection, TrainConfig),
        ("train.", r.TrainSection, TrainConfig),
        ("eval.", r.EvalSection, r.EvalSection),
        ("eval.lm_eval.", r.LmEvalSection, r.LmEvalSection),
        ("output.", r.OutputSection, r.OutputSection),
    ]
    for prefix, schema, doc_source in sections:
        docs = {**_attribute_docs(doc_source), **_attribute_docs(schema)}
        for f in dataclasses.fields(schema):
            if prefix == "" and f.name in ("data", "train", "eval", "output"):
                continue
            doc = docs.get(f.name, "")
            lines.append(f"  {prefix}{f.name}" + (f": {doc}" if doc else ""))
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="compose",
        description="Teach a pretrained LLM new skills without breaking the old ones "
        "(block expansion, CALM; LoRA and full fine-tuning baselines).",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    _add_train(sub)

    p = sub.add_parser(
        "eval",
        help="perplexity, exact match and lm-evaluation-harness tasks on a saved model",
        description="Evaluate a directory written by Composer.save (or `compose train`): perplexity sets (--data), "
        "prompt/answer generation (--exact-match) and lm-evaluation-harness tasks (--lm-eval). Give at least one.",
    )
    p.add_argument("dir", help="a directory with compose.json")
    p.add_argument(
        "--data",
        action="append",
        default=[],
        metavar="[NAME=]SOURCE",
        help="a perplexity set: a .txt/.jsonl/.parquet file or a hub dataset name; repeat for several",
    )
    p.add_argument("--exact-match", action="append", default=[], metavar="[NAME=]FILE", help="prompt/answer records")
    p.add_argument(
        "--lm-eval",
        action="append",
        default=[],
        metavar="TASK[,TASK]",
        help="lm-evaluation-harness tasks or groups (gsm8k, mmlu, ...); repeat or separate with commas",
    )
    p.add_argument("--num-fewshot", type=int, default=None, help="--lm-eval: examples per prompt (default: the task's)")
    p.add_argument(
        "--limit",
        type=float,
        default=None,
        help="--lm-eval: at most this many documents per task (below 1: a fraction); for quick checks only",
    )
    p.add_argument(
        "--include-path",
        action="append",
        default=[],
        metavar="DIR",
        help="--lm-eval: a folder with task YAML files of your own; repeat for several",
    )
    p.add_argument(
        "--confirm-run-unsafe-code",
        action="store_true",
        help="--lm-eval: allow tasks that execute generated code (humaneval, mbpp; also set HF_ALLOW_CODE_EVAL=1)",
    )
    p.add_argument("--seq-len", type=int, default=None, help="tokens per block (default: min(1024, model limit))")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-batches", type=int, default=None, help="cap on batches per set")
    p.add_argument("--max-new-tokens", type=int, default=None, help="exact-match generation length")
    p.add_argument("--json", default=None, metavar="FILE", help="also write the results as JSON")

    _add_generate(sub)
    _add_check(sub)
    _add_export(sub)
    _add_import_gguf(sub)
    _add_push(sub)
    return parser


def _add_train(sub) -> None:
    p = sub.add_parser(
        "train",
        help="run a recipe (all its stages): fit, evaluate, save",
        description="Run a YAML recipe: build the Composer(s), fit, evaluate the named sets, save to output.dir.",
        epilog=_recipe_keys_help(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("recipe", help="path to a YAML recipe")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="overrides, e.g. train.max_steps=20")
    p.add_argument("--dry-run", action="store_true", help="validate and print the resolved recipe, then stop")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _add_generate(sub) -> None:
    p = sub.add_parser(
        "generate",
        help="generate text from a saved model",
        description="Generate continuations of prompts with a saved model (greedy unless --sample).",
    )
    p.add_argument("dir", help="a directory with compose.json")
    p.add_argument("--prompt", action="append", required=True, help="a prompt; repeat for several")
    p.add_argument("--max-new-tokens", type=_positive_int, default=64)
    p.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--chat",
        action="store_true",
        help="each prompt is a user message: render it with the model's chat template and print the reply",
    )
    p.add_argument("--system", help="--chat: a system message before the user's")
    p.add_argument(
        "--chat-template", help="--chat: a built-in template name (chatml, tulu, tiny), a .jinja file or Jinja text"
    )


def _add_check(sub) -> None:
    p = sub.add_parser(
        "check",
        help="validate recipes without loading any weights",
        description="Validate recipes with the same checks a run makes before training: schema, every value, "
        "strategy options against the models' configs, local paths; prints each stage's trainable parameters "
        "(models built on the meta device). Loads no weights and downloads nothing. Exit status 1 if any fails.",
    )
    p.add_argument("recipes", nargs="+", help="YAML recipes")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="an override applied to each")


def _add_export(sub) -> None:
    p = sub.add_parser(
        "export",
        help="write a saved model as a plain transformers checkpoint",
        description="lora: adapters merged into the weights; block_expand / full: the model without compose.json. "
        "The result loads with AutoModelForCausalLM.from_pretrained. calm cannot be exported.",
    )
    p.add_argument("dir", help="a directory with compose.json")
    p.add_argument("out", help="the new checkpoint directory (new, empty, or an earlier export)")
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="write into OUT even if it holds other files (they are kept; only compose's files are replaced)",
    )
    p.add_argument(
        "--max-shard-size",
        default=None,
        metavar="SIZE",
        help="split the weights into safetensors shards of at most SIZE (e.g. 5GB, 500MB) with an index",
    )


def _add_push(sub) -> None:
    p = sub.add_parser(
        "push",
        help="upload a saved or exported model (with its model card) to the Hugging Face Hub",
        description="Upload DIR (written by Composer.save, `compose train` or `compose export`, with its README.md "
        "model card) to the Hub repository REPO, created if missing. Needs a token: `huggingface-cli login` or "
        "HF_TOKEN. compose's own bookkeeping files are not uploaded.",
    )
    p.add_argument("dir", help="the model directory")
    p.add_argument("repo", help="the Hub repository id, user-or-org/name")
    p.add_argument("--private", action="store_true", help="create the repository private")
    p.add_argument("--revision", default=None, help="the branch to push to (default: main)")
    p.add_argument("--commit-message", default=None)
    p.add_argument("--create-pr", action="store_true", help="open a pull request instead of committing to the branch")


def _add_import_gguf(sub) -> None:
    p = sub.add_parser(
        "import-gguf",
        help="dequantize a GGUF file into a plain transformers folder",
        description="Reads a GGUF file (llama.cpp's format) with transformers, dequantizes it and writes "
        "config.json, safetensors weights and the tokenizer to OUT. A .gguf path also works directly as a "
        "model anywhere (converted once into ~/.cache/compose/gguf, or $COMPOSE_CACHE/gguf). Needs 'pip install gguf'.",
    )
    p.add_argument("file", help="the .gguf file")
    p.add_argument("out", help="the new folder (new, empty, or an earlier import)")
    p.add_argument("--dtype", default="float32", help="dtype of the written weights (default float32)")
    p.add_argument("--overwrite", action="store_true", help="write into OUT even if compose did not create it")


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
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    from . import arch
    from .validation import validate_generate_options

    limit = arch.max_positions(composer.model.config) if hasattr(composer.model, "config") else None
    for prompt in args.prompt:
        enc = _chat_encoding(tok, prompt, args) if args.chat else tok(prompt, return_tensors="pt")
        kwargs: dict[str, Any] = {"max_new_tokens": args.max_new_tokens, "do_sample": args.sample}
        if args.chat:
            from .chat import stop_token_ids

            kwargs["eos_token_id"] = stop_token_ids(tok)
        if args.sample:
            kwargs.update(temperature=args.temperature, top_p=args.top_p)
        kwargs = validate_generate_options(kwargs, prompt_length=enc["input_ids"].shape[1], max_positions=limit)
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


_COMMANDS = {
    "train": _cmd_train,
    "eval": _cmd_eval,
    "generate": _cmd_generate,
    "check": _cmd_check,
    "export": _cmd_export,
    "import-gguf": _cmd_import_gguf,
    "push": _cmd_push,
}


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``compose`` console script; returns the exit status."""
    args = build_parser().parse_args(argv)
    try:
        return _COMMANDS[args.command](args)
    except (ValueError, FileNotFoundError, OSError, TypeError, RuntimeError) as e:
        print(f"compose {args.command}: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
