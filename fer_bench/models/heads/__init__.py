"""Heads: optional parts of a FerModel, one self-contained file each, chosen by name in a recipe's ``model.heads``.

* ``au_heatmap`` — attention guided by action-unit maps (:mod:`.au_heatmap`);
* ``anchors`` — anchor-based reliability balancing of the label distribution (:mod:`.anchors`);
* ``occlusion`` — detect, mask and reconstruct occluded patches (:mod:`.occlusion`).
"""

from __future__ import annotations

from typing import Any

from torch import nn

from fer_bench.errors import ConfigError
from fer_bench.models.heads._base import HeadContext
from fer_bench.models.heads.anchors import AnchorHead
from fer_bench.models.heads.au_heatmap import AUHeatmapHead
from fer_bench.models.heads.occlusion import OcclusionHead
from fer_bench.options import check_keywords
from fer_bench.registry import Registry

HEADS: Registry[type[nn.Module]] = Registry("head")
HEADS.register("au_heatmap", AUHeatmapHead)
HEADS.register("anchors", AnchorHead)
HEADS.register("occlusion", OcclusionHead)


def list_heads() -> list[str]:
    return HEADS.names()


def check_head_options(heads: dict[str, Any]) -> None:
    """Raise ConfigError for an unknown head name or option (with did-you-mean), before any model is built."""
    for name, options in heads.items():
        if name not in HEADS:
            raise ConfigError(f"model.heads: {HEADS.unknown_message(name)}")
        if options is not None and not isinstance(options, dict):
            raise ConfigError(f"model.heads.{name}: expected a mapping of options (or {{}}), got {options!r}")
        check_keywords(HEADS.get(name).__init__, options or {}, what=f"model.heads.{name}")


def create_head(name: str, context: HeadContext, **options) -> nn.Module:
    """Build head ``name`` for a backbone described by ``context`` with its recipe ``options``."""
    check_head_options({name: options})
    return HEADS.get(name)(context, **options)


__all__ = ["HEADS", "HeadContext", "check_head_options", "create_head", "list_heads"]
