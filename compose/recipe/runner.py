"""Running a recipe: per stage, build the Composer, fit, evaluate, write results; then mark it complete.

Each stage's output directory follows :meth:`Composer.fit`'s rules (a lock while it runs,
no silent restart over a finished run, ``complete.json`` last): the results, the recipe
copy and the plots are written inside the run, before its completion marker, so a run
that dies while writing them (a full disk) is not marked complete.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from ..data import _is_main_process, _load_source, build_data
from ..publish import describe_sources
from ..testing import TINY_PREFIX, tiny_tokenizer
from .check import check_recipe
from .models import resolve_model
from .schema import _as_list, to_container
from .stages import Recipe, Stage

__all__ = ["run_recipe", "RECIPE_FILE"]

RECIPE_FILE = "recipe.yaml"


def _build_composer(stage: Stage):
    from ..composer import Composer

    cfg = stage.config
    augments = [resolve_model(str(a), dtype=cfg.dtype) for a in _as_list(to_container(cfg.augment))]
    anchor = resolve_model(cfg.anchor, dtype=cfg.dtype)
    tokenizer = cfg.data.tokenizer
    if tokenizer is None and isinstance(cfg.anchor, str) and cfg.anchor.startswith(TINY_PREFIX):
        tokenizer = tiny_tokenizer()
    augment_tokenizer = to_container(cfg.data.augment_tokenizer)
    extra = {} if augment_tokenizer is None else {"augment_tokenizer": augment_tokenizer}
    return Composer(
        anchor,
        augments if len(augments) > 1 else (augments[0] if augments else None),
        strategy=stage.strategy_config,
        tokenizer=tokenizer,
        **extra,
        copy_model=False,
        dtype=cfg.dtype,
    )


def _evaluate(composer, cfg: DictConfig) -> dict[str, Any]:
    from ..evaluate import exact_match, perplexity_report

    ev = cfg.eval
    seq_len = ev.seq_len or cfg.data.seq_len
    sets = {name: _eval_records(src, cfg.data.text_field) for name, src in to_container(ev.perplexity).items()}
    out: dict[str, Any] = {}
    if sets:
        out["perplexity"] = perplexity_report(
            composer,
            sets,
            batch_size=ev.batch_size,
            seq_len=seq_len,
            max_batches=ev.max_batches,
            text_field=cfg.data.text_field,
        )
    if ev.exact_match:
        out["exact_match"] = {}
        for name, src in to_container(ev.exact_match).items():
            records, _ = _load_source(src, cfg.data.text_field)
            res = exact_match(composer, records, max_new_tokens=ev.max_new_tokens, batch_size=ev.batch_size)
            out["exact_match"][name] = {k: v for k, v in res.items() if k != "predictions"}
    if ev.get("lm_eval"):
        out["lm_eval"] = _lm_eval(composer, to_container(ev.lm_eval))
    return out


def _eval_records(sources: Any, text_field: str):
    """The records of one evaluation set (one source or a list of them), each record one document."""
    import datasets

    loaded = [_load_source(src, text_field)[0] for src in (sources if isinstance(sources, list) else [sources])]
    return loaded[0] if len(loaded) == 1 else datasets.concatenate_datasets(loaded)


def _lm_eval(composer, spec: dict[str, Any]) -> Any:
    """lm-evaluation-harness tasks, through ``compose.evaluate.lm_eval`` (imported only when asked for)."""
    try:
        from ..evaluate import lm_eval
    except ImportError as e:
        raise RuntimeError(f"eval.lm_eval needs compose.evaluate.lm_eval, which this install lacks ({e})") from e
    return lm_eval(
        composer.model,
        composer.tokenizer,
        tasks=list(spec["tasks"]),
        num_fewshot=spec.get("num_fewshot"),
        limit=spec.get("limit"),
        batch_size=spec.get("batch_size", 8),
    )


def _write_outputs(composer, cfg: DictConfig, recipe: Recipe, name: str, result: dict[str, Any]) -> None:
    from ..evaluate import plot_forgetting, plot_history, plot_perplexity
    from ..io import write_json, write_text
    from ..publish import CardInfo, card_is_foreign, write_model_card

    out = Path(cfg.output.dir)
    final = out / "final"
    write_text(final / RECIPE_FILE, recipe.to_yaml())
    write_json(final / "results.json", {k: v for k, v in result.items() if k != "history"})
    if not card_is_foreign(final):  # the card again, now with the recipe and the evaluation table
        write_model_card(final, CardInfo.from_composer(composer, recipe=recipe.to_yaml(), results=result))
    if not cfg.eval.plots:
        return
    plot_history(composer.history, out / "loss.png", title=name)
    if result["eval"].get("perplexity"):
        reports = {"after": result["eval"]["perplexity"]}
        if "baseline" in result:
            reports = {"before": result["baseline"]["perplexity"], **reports}
        plot_perplexity(reports, out / "perplexity.png", title=name)
    if result.get("forgetting"):
        plot_forgetting(result["forgetting"], out / "forgetting.png", title=name)


def _report(say, name: str, result: dict[str, Any]) -> None:
    from ..evaluate import format_table

    for set_name, rep in result["eval"].get("perplexity", {}).items():
        say(f"compose: {name}: perplexity {set_name} = {rep['perplexity']:.3f}")
    for task, rep in result["eval"].get("exact_match", {}).items():
        say(f"compose: {name}: exact match {task} = {rep['accuracy']:.3f} ({rep['correct']}/{rep['total']})")
    if result.get("forgetting"):
        say(format_table(result["forgetting"]))


def _run_stage(stage: Stage, recipe: Recipe, say, main: bool) -> dict[str, Any]:
    from ..evaluate import forgetting_report

    cfg = stage.config
    name = stage.name or "main"
    tc = stage.train_config  # built and checked by load_recipe
    say(f"compose: stage {name}: {cfg.strategy} on {cfg.anchor} -> {tc.output_dir}")
    composer = _build_composer(stage)
    composer.data_names = describe_sources(to_container(cfg.data.train))
    say(f"compose: {composer!r}")
    measured = cfg.eval.perplexity or cfg.eval.exact_match or cfg.eval.get("lm_eval")
    baseline = _evaluate(composer, cfg) if cfg.eval.baseline and cfg.eval.perplexity else None
    train_blocks = build_data(cfg.data.train, composer, cfg, seed=tc.seed, streaming=tc.streaming)
    eval_blocks = build_data(cfg.data.eval, composer, cfg) if cfg.data.eval else None
    result: dict[str, Any] = {"output": str(Path(tc.output_dir) / "final")}

    def after(c) -> None:
        result["history"] = c.history
        result["eval"] = _evaluate(c, cfg) if measured else {}
        if baseline is not None:
            result["baseline"] = baseline
            result["forgetting"] = forgetting_report(
                baseline["perplexity"], result["eval"]["perplexity"], domain=cfg.eval.domain
            )
        if main:
            _write_outputs(c, cfg, recipe, name, result)
            _report(say, name, result)

    composer.fit(train_blocks, eval_blocks, config=tc, after=after)
    return result


def run_recipe(recipe: Recipe | str | os.PathLike, overrides: list[str] | tuple[str, ...] = (), *, log=print) -> dict:
    """Run every stage: build the Composer, fit, evaluate the named sets, save.

    Each stage writes ``<dir>/final`` (the model, as ``Composer.save`` writes it) with a
    copy of the resolved recipe (``recipe.yaml``) and ``results.json`` beside the weights,
    then ``<dir>/complete.json``. Returns ``{stage name: {"output", "history", "eval",
    "baseline", "forgetting"}}`` (a single-stage recipe's stage is named ``"main"``).
    """
    from ..io import write_text

    if not isinstance(recipe, Recipe):
        recipe = check_recipe(recipe, overrides)
    main = _is_main_process()
    say = log if main else (lambda *a, **k: None)
    results = {stage.name or "main": _run_stage(stage, recipe, say, main) for stage in recipe.stages}
    if main and len(recipe.stages) > 1:
        Path(recipe.config.output.dir).mkdir(parents=True, exist_ok=True)
        write_text(Path(recipe.config.output.dir) / RECIPE_FILE, recipe.to_yaml())
    return results
