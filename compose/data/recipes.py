"""Recipe data: weighted sources (:func:`build_data`) and the options a recipe gives them."""

from __future__ import annotations

from typing import Any

import torch
from accelerate import PartialState

from .blocks import TokenBlocks, build_blocks
from .padding import pad_id_of
from .sources import load_records


def _is_main_process() -> bool:
    """Whether this process is the main one (the only one outside ``accelerate launch``)."""
    return PartialState().is_main_process


def _load_source(src: Any, text_field: str, *, streaming: bool = False):
    """Records of one data source (a path / hub name, or a mapping with hub options) and its weight."""
    spec = dict(src) if isinstance(src, dict) else {"path": src}
    path = spec["path"]
    split = spec.get("split") or "train"
    if spec.get("name") or spec.get("data_dir"):
        import datasets

        records = datasets.load_dataset(
            path, spec.get("name"), data_dir=spec.get("data_dir"), split=split, streaming=streaming
        )
    else:
        records = load_records(path, split=split, text_field=text_field, streaming=streaming)
    columns = {k: v for k, v in (spec.get("columns") or {}).items() if k != v}
    if columns:
        names = records.column_names or []
        clash = [v for v in columns.values() if v in names and v not in columns]
        records = records.remove_columns(clash).rename_columns(columns)
    limit = spec.get("max_records")
    if limit is not None:
        records = records.take(limit) if streaming else records.select(range(min(limit, len(records))))
    return records, float(spec.get("weight", 1.0))


def _recipe_option(cfg, name: str, default: Any = None) -> Any:
    from omegaconf import OmegaConf

    for key in (f"data.{name}", f"train.{name}"):
        value = OmegaConf.select(cfg, key, default=None)
        if value is not None:
            return value
    return default


def _document_positions(cfg) -> bool:
    """Whether a recipe's blocks carry per-document positions (``packing_attention: document``)."""
    return cfg.data.packing_attention == "document" or bool(_recipe_option(cfg, "reset_position_ids", False))


def build_data(
    sources: Any, composer, cfg, seq_len: int | None = None, *, seed: int = 0, streaming: bool = False
) -> Any:
    """Tokenized, packed blocks of one or more recipe sources, ``weight``-ed (repeated), concatenated.

    ``streaming=True``: the sources themselves, streamed (an ``IterableDataset``; several are
    interleaved with probabilities proportional to their weights), for ``fit(..., streaming=True)``.
    """
    import datasets
    from omegaconf import OmegaConf

    if OmegaConf.is_config(sources):
        sources = OmegaConf.to_container(sources, resolve=True)
    sources = sources if isinstance(sources, list) else [sources]
    if streaming:
        loaded = [_load_source(src, cfg.data.text_field, streaming=True) for src in sources]
        if len(loaded) == 1:
            return loaded[0][0]
        total = sum(w for _, w in loaded)
        return datasets.interleave_datasets(
            [r for r, _ in loaded], probabilities=[w / total for _, w in loaded], seed=seed,
            stopping_strategy="all_exhausted",
        )  # fmt: skip
    pad = pad_id_of(composer.model.config)
    seq_len = seq_len or cfg.data.seq_len
    parts = []
    for src in sources:
        records, weight = _load_source(src, cfg.data.text_field)
        blocks = build_blocks(
            records,
            composer.tokenizer,
            seq_len,
            packing=cfg.data.packing,
            mask_prompt=cfg.data.mask_prompt,
            text_field=cfg.data.text_field,
            pad_token_id=pad,
            num_proc=_recipe_option(cfg, "num_proc"),
            cache_dir=_recipe_option(cfg, "cache_dir") or _recipe_option(cfg, "data_cache_dir"),
            reset_position_ids=_document_positions(cfg),
            chat_template=cfg.data.chat_template,
        )
        whole, frac = int(weight), weight - int(weight)
        idx = list(range(len(blocks))) * whole
        if frac:
            perm = torch.randperm(len(blocks), generator=torch.Generator().manual_seed(seed))
            idx += perm[: round(frac * len(blocks))].tolist()
        parts.append(blocks.dataset.with_format(None).select(idx))
    return TokenBlocks(datasets.concatenate_datasets(parts), seq_len, pad)
