"""Data sources of a recipe: records of one source, token blocks of several, the main-process test."""

from __future__ import annotations

from typing import Any

from omegaconf import DictConfig

from .schema import _as_list, _to_container


def _is_main_process() -> bool:
    try:
        from accelerate import PartialState

        return PartialState().is_main_process
    except Exception:  # noqa: BLE001 - no accelerate state: a single process
        return True


def _load_source(src: Any, text_field: str):
    """Records of one data source (a path / hub name, or a mapping with hub options)."""
    from ..data import load_records

    spec = dict(src) if isinstance(src, dict) else {"path": src}
    path = spec["path"]
    split = spec.get("split") or "train"
    if spec.get("name") or spec.get("data_dir"):
        import datasets

        records = datasets.load_dataset(path, spec.get("name"), data_dir=spec.get("data_dir"), split=split)
    else:
        records = load_records(path, split=split, text_field=text_field)
    columns = {k: v for k, v in (spec.get("columns") or {}).items() if k != v}
    if columns:
        if hasattr(records, "rename_columns"):
            clash = [v for v in columns.values() if v in records.column_names and v not in columns]
            records = records.remove_columns(clash).rename_columns(columns)
        else:
            records = [
                {columns.get(k, k): v for k, v in r.items() if k in columns or k not in columns.values()}
                for r in records
            ]
    limit = spec.get("max_records")
    if limit is not None:
        records = records.select(range(min(limit, len(records)))) if hasattr(records, "select") else records[:limit]
    return records, float(spec.get("weight", 1.0))


def build_data(sources: Any, composer, cfg: DictConfig, seq_len: int | None = None, *, seed: int = 0):
    """Tokenized, packed blocks of one or more sources, ``weight``-ed (repeated), concatenated."""
    import torch

    from ..data import TokenBlocks, build_blocks

    pad = getattr(composer.model.config, "pad_token_id", None)
    pad = pad if isinstance(pad, int) and pad >= 0 else 0
    parts = []
    for src in _as_list(_to_container(sources)):
        records, weight = _load_source(src, cfg.data.text_field)
        blocks = build_blocks(
            records,
            composer.tokenizer,
            seq_len or cfg.data.seq_len,
            packing=cfg.data.packing,
            mask_prompt=cfg.data.mask_prompt,
            text_field=cfg.data.text_field,
            pad_token_id=pad,
        )
        n = len(blocks)
        whole, frac = int(weight), weight - int(weight)
        idx = list(range(n)) * whole
        if frac:
            gen = torch.Generator().manual_seed(seed)
            idx += torch.randperm(n, generator=gen)[: round(frac * n)].tolist()
        parts.append((blocks, idx))
    ids = torch.cat([b.input_ids[i] for b, i in parts])
    labels = torch.cat([b.labels[i] for b, i in parts])
    mask = torch.cat([b.attention_mask[i] for b, i in parts])
    return TokenBlocks(ids, labels, mask)
