"""Models: timm ViT/Swin backbones wrapped as FerModel. Never imports ``fer_bench.data``."""

from fer_bench.models.backbone import create_backbone, set_fused_attention, token_map
from fer_bench.models.fer_model import FerModel, create_model
from fer_bench.models.heads import list_heads

__all__ = ["FerModel", "create_backbone", "create_model", "list_heads", "set_fused_attention", "token_map"]
