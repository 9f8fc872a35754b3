"""``key=value`` overrides, read with ``OmegaConf.from_dotlist`` and applied with ``OmegaConf.update``.

Values are read as YAML, as in recipe files (``1e-3`` is a number, ``false`` a bool,
``[1, 2]`` a list, ``{}`` an empty mapping); a value replaces what was there (mappings
are not merged). ``stages.1.train.learning_rate=1e-5`` addresses one stage.
"""

from __future__ import annotations

from typing import Any

import yaml
from omegaconf import OmegaConf
from omegaconf import errors as oc_errors

from .schema import RecipeError

__all__ = ["parse_override", "apply_override", "has_key"]


def parse_override(item: str) -> tuple[str, Any]:
    """``"train.max_steps=2"`` -> ``("train.max_steps", 2)``."""
    if not isinstance(item, str) or "=" not in item:
        raise RecipeError(f"override {item!r} is not of the form key=value (e.g. train.max_steps=2)")
    key = item.split("=", 1)[0].strip()
    if not key or any(not part for part in key.split(".")):
        raise RecipeError(f"override {item!r} has no key, or an empty part in it (e.g. train.max_steps=2)")
    try:
        parsed = OmegaConf.from_dotlist([item])
        value = OmegaConf.select(parsed, key, throw_on_missing=True)
    except oc_errors.OmegaConfBaseException as e:
        raise RecipeError(f"override {item!r} could not be read ({e.msg or e})") from None
    except yaml.YAMLError as e:
        value = item.split("=", 1)[1]
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise RecipeError(
            f"override {item!r}: the value {value!r} is not valid YAML ({problem}); fix it, or quote it to pass a "
            "string (e.g. key='\"[1,2\"')"
        ) from None
    return key, OmegaConf.to_container(value) if OmegaConf.is_config(value) else value


def apply_override(tree: dict, key: str, value: Any) -> None:
    """Set ``key`` in the plain dict ``tree`` (creating sections), naming the override on failure."""
    cfg = OmegaConf.create(tree)
    parts = key.split(".")
    node: Any = tree
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                raise RecipeError(f"override {key!r}: there is no list item {part!r} (the list has {len(node)})")
            node = node[int(part)]
        elif isinstance(node, dict) and node.get(part) is not None:
            node = node[part]
        else:
            break  # the rest of the path is created
        if not last and not isinstance(node, (dict, list)):
            raise RecipeError(f"override {key!r}: {'.'.join(parts[: i + 1])!r} is a value, not a section")
    try:
        OmegaConf.update(cfg, key, value, merge=False, force_add=True)
    except (oc_errors.OmegaConfBaseException, IndexError, ValueError) as e:
        raise RecipeError(f"override {key!r} could not be applied ({getattr(e, 'msg', None) or e})") from None
    tree.clear()
    tree.update(OmegaConf.to_container(cfg, resolve=False))


def has_key(tree: Any, key: str) -> bool:
    """Whether the plain dict/list ``tree`` holds ``key`` (a dotted path)."""
    node = tree
    for part in key.split("."):
        if isinstance(node, dict) and part in node:
            node = node[part]
        elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        else:
            return False
    return True
