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
import sys

from .cli_commands import (
    _cmd_check,
    _cmd_eval,
    _cmd_export,
    _cmd_generate,
    _cmd_import_gguf,
    _cmd_push,
    _cmd_train,
)
from .rules import help_of
from .strategies import STRATEGIES, Strategy
from .strategies.base import option_summary

__all__ = ["main", "build_parser"]


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
        docs = {**help_of(doc_source), **help_of(schema)}
        for f in dataclasses.fields(schema):
            if prefix == "" and f.name in ("data", "train", "eval", "output"):
                continue
            doc = docs.get(f.name, "")
            if prefix == "" and f.name == "strategy":
                doc = f"{doc} One of: {', '.join(sorted(STRATEGIES))}."
            lines.append(f"  {prefix}{f.name}" + (f": {doc}" if doc else ""))
            if prefix == "" and f.name == "options":
                lines += [f"    {n}: {option_summary(STRATEGIES[n].config_class)}" for n in sorted(STRATEGIES)]
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="compose",
        description="Teach a pretrained LLM new skills without breaking the old ones. Strategies: "
        + "; ".join(f"{name} ({cls.method or name})" for name, cls in sorted(STRATEGIES.items()))
        + ".",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    _add_train(sub)

    _add_eval(sub)
    _add_generate(sub)
    _add_check(sub)
    _add_export(sub)
    _add_import_gguf(sub)
    _add_push(sub)
    return parser


def _add_eval(sub) -> None:
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
        description=_export_description(),
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


def _export_description() -> str:
    """Which strategies ``compose export`` writes as a plain checkpoint, from the registry."""
    plain = sorted(n for n, c in STRATEGIES.items() if c.saves_full_model)
    merged = sorted(n for n, c in STRATEGIES.items() if not c.saves_full_model and c.export is not Strategy.export)
    other = sorted(set(STRATEGIES) - set(plain) - set(merged))
    text = (f"{' / '.join(merged)}: adapters merged into the weights; " if merged else "") + (
        f"{' / '.join(plain)}: the model without compose.json. " if plain else ""
    )
    text += "The result loads with AutoModelForCausalLM.from_pretrained."
    return text + (f" {', '.join(other)} cannot be exported." if other else "")


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
