"""Lets lm-evaluation-harness find models that installed packages declare as plugins.

compose declares ``compose = compose.lm_eval_model:ComposeLM`` in the ``lm_eval.models``
entry-point group, which lm-eval releases with plugin discovery read themselves. For releases
without it (0.4.13 and earlier), the ``compose_lm_eval.pth`` file that compose installs calls
:func:`install` at interpreter start: when ``lm_eval.models`` is first imported, every entry
point of that group whose name lm-eval does not know yet is added to its model registry as a
lazy ``module:Class`` placeholder. Nothing is imported until lm-eval asks for the model, so
``lm_eval --model compose`` works from lm-eval's own command line.

This module is imported at every interpreter start: it imports nothing heavy and never raises.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import sys

GROUP = "lm_eval.models"
_TARGET = "lm_eval.models"


def register_entry_points() -> list[str]:
    """Add the ``lm_eval.models`` entry points lm-eval does not know yet; returns their names."""
    from importlib.metadata import entry_points

    from lm_eval.api.registry import model_registry

    added = []
    for ep in entry_points(group=GROUP):
        if ep.name not in model_registry:
            # a "module:Class" string, so that the class's own @register_model upgrades it in place
            model_registry.register(ep.name, target=f"{ep.module}:{ep.attr}")
            added.append(ep.name)
    return added


class _Loader(importlib.abc.Loader):
    def __init__(self, loader):
        self._loader = loader

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module) -> None:
        self._loader.exec_module(module)
        try:
            register_entry_points()
        except Exception:  # noqa: BLE001 - a plugin problem must never break lm-eval itself
            pass


class _Finder(importlib.abc.MetaPathFinder):
    _busy = False

    def find_spec(self, fullname, path=None, target=None):
        if fullname != _TARGET or self._busy:
            return None
        self._busy = True
        try:
            spec = importlib.util.find_spec(fullname)
        finally:
            self._busy = False
        if spec is None or spec.loader is None:
            return None
        spec.loader = _Loader(spec.loader)
        return spec


def install() -> None:
    """Watch for the first import of ``lm_eval.models`` (idempotent; never raises)."""
    try:
        if not any(isinstance(f, _Finder) for f in sys.meta_path):
            sys.meta_path.insert(0, _Finder())
    except Exception:  # noqa: BLE001 - runs at interpreter start
        pass
