"""Data: label spaces, the manifest contract, dataset adapters, SynthFER, transforms and the torch dataset.

``fer_bench.data`` never imports ``fer_bench.models`` (and vice versa).
"""

from fer_bench.data import synthfer as _synthfer  # noqa: F401  (registers "synthfer")
from fer_bench.data._registry import get_dataset, list_datasets, register_dataset
from fer_bench.data.dataset import FaceDataset, decode_image
from fer_bench.data.labels import CANONICAL_EXPRESSIONS, LabelSpace, get_label_space, list_label_spaces
from fer_bench.data.manifest import DatasetInfo, dataset_hash, validate_manifest
from fer_bench.data.synthfer import SynthFERConfig, generate_synthfer
from fer_bench.data.transforms import AugmentOptions, create_transform

__all__ = [
    "CANONICAL_EXPRESSIONS",
    "AugmentOptions",
    "DatasetInfo",
    "FaceDataset",
    "LabelSpace",
    "SynthFERConfig",
    "create_transform",
    "dataset_hash",
    "decode_image",
    "generate_synthfer",
    "get_dataset",
    "get_label_space",
    "list_datasets",
    "list_label_spaces",
    "register_dataset",
    "validate_manifest",
]
