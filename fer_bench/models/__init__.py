"""Models: timm ViT/Swin backbones wrapped as FerModel. Never imports ``fer_bench.data``."""

from fer_bench.models.backbone import create_backbone, token_map
from fer_bench.models.fer_model import FerModel, create_model

__all__ = ["FerModel", "create_backbone", "create_model", "token_map"]
