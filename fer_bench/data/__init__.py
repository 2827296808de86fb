"""Data: label spaces, the manifest contract, dataset adapters, SynthFER, transforms and the torch dataset.

``fer_bench.data`` never imports ``fer_bench.models`` (and vice versa).
"""

from fer_bench.data import adapters as _adapters  # noqa: F401  (registers the dataset adapters)
from fer_bench.data import synthfer as _synthfer  # noqa: F401  (registers "synthfer")
from fer_bench.data._registry import (
    check_dataset_options,
    dataset_options,
    get_dataset,
    list_datasets,
    register_dataset,
)
from fer_bench.data.dataset import FaceDataset, decode_image
from fer_bench.data.describe import count_warnings, describe_dataset, load_card, verify_images
from fer_bench.data.labels import CANONICAL_EXPRESSIONS, LabelSpace, get_label_space, list_label_spaces
from fer_bench.data.manifest import DatasetInfo, dataset_hash, validate_manifest, with_validation_split
from fer_bench.data.synthfer import SynthFERConfig, generate_synthfer
from fer_bench.data.transforms import AugmentOptions, create_transform

__all__ = [
    "CANONICAL_EXPRESSIONS",
    "AugmentOptions",
    "DatasetInfo",
    "FaceDataset",
    "LabelSpace",
    "SynthFERConfig",
    "check_dataset_options",
    "count_warnings",
    "create_transform",
    "dataset_hash",
    "dataset_options",
    "decode_image",
    "describe_dataset",
    "generate_synthfer",
    "get_dataset",
    "get_label_space",
    "list_datasets",
    "list_label_spaces",
    "load_card",
    "register_dataset",
    "validate_manifest",
    "verify_images",
    "with_validation_split",
]
