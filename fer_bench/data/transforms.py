"""Albumentations pipelines built from explicit options; every transform is built with ``strict=True`` so a
misspelt argument raises instead of being ignored (albumentations 2.0.8, the last MIT release)."""

from __future__ import annotations

import albumentations as A
import cv2
from albumentations.pytorch import ToTensorV2
from pydantic import BaseModel, ConfigDict, Field

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class AugmentOptions(BaseModel):
    """Training augmentation strengths (probabilities; 0 turns a transform off): the data layer's options and the
    recipe's ``data.augment`` section alike (unknown keys and out-of-range values are rejected).

    Attributes:
        hflip: Horizontal flip probability (applied by the dataset, which also swaps left/right landmarks).
        affine: Probability of a random rotation (±rotate degrees), scale (1 ± scale) and shift (± translate).
        rotate, scale, translate: Affine ranges.
        color: Probability of a brightness/contrast change of up to ±0.2.
        blur: Probability of a Gaussian blur (sigma up to 1 px at 112 px).
        erasing: Probability of 1-2 random erased boxes of 10-25 % of the side (CoarseDropout).
        occluders: Probability of one synthetic occluder (object, hand, bar or noise patch; drawn by the dataset,
            see :mod:`fer_bench.data.occluders`): occlusion augmentation without the occlusion head, the usual
            robustness baseline. The ``occlusion`` head's ``augment`` option replaces it.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    hflip: float = Field(0.5, ge=0, le=1)
    affine: float = Field(0.7, ge=0, le=1)
    rotate: float = Field(10.0, ge=0, le=45)
    scale: float = Field(0.1, ge=0, lt=1)
    translate: float = Field(0.06, ge=0, le=0.5)
    color: float = Field(0.5, ge=0, le=1)
    blur: float = Field(0.0, ge=0, le=1)
    erasing: float = Field(0.0, ge=0, le=1)
    occluders: float = Field(0.0, ge=0, le=1)


def create_transform(
    *,
    train: bool,
    img_size: int,
    augment: AugmentOptions | None = None,
    mean: tuple[float, ...] = IMAGENET_MEAN,
    std: tuple[float, ...] = IMAGENET_STD,
    with_clean: bool = False,
) -> A.Compose:
    """Build the train or eval pipeline: resize to ``img_size`` → (augment) → normalise → CHW tensor.

    Eval is a plain resize of the (already face-cropped) image, so every protocol sees the same pixels.
    ``keypoints`` (xy pixels), when given, move through the geometric transforms with the image; with
    ``with_clean`` a second image ``clean_image`` (the un-occluded original) gets exactly the same transform.
    """
    # Resize first: augmenting at the training resolution is several times cheaper than at the source size.
    steps: list[A.BasicTransform] = [
        A.Resize(height=img_size, width=img_size, interpolation=cv2.INTER_AREA, strict=True)
    ]
    if train:
        augment = augment or AugmentOptions()
        if augment.affine > 0:
            steps.append(
                A.Affine(
                    scale=(1 - augment.scale, 1 + augment.scale),
                    translate_percent=(-augment.translate, augment.translate),
                    rotate=(-augment.rotate, augment.rotate),
                    border_mode=cv2.BORDER_REPLICATE,
                    p=augment.affine,
                    strict=True,
                )
            )
        if augment.color > 0:
            steps.append(
                A.RandomBrightnessContrast(brightness_limit=0.2, contrast_limit=0.2, p=augment.color, strict=True)
            )
        if augment.blur > 0:
            steps.append(A.GaussianBlur(sigma_limit=(0.1, 1.0), blur_limit=0, p=augment.blur, strict=True))
        if augment.erasing > 0:
            steps.append(
                A.CoarseDropout(
                    num_holes_range=(1, 2),
                    hole_height_range=(0.1, 0.25),
                    hole_width_range=(0.1, 0.25),
                    fill=0,
                    p=augment.erasing,
                    strict=True,
                )
            )
    steps += [
        A.Normalize(mean=mean, std=std, max_pixel_value=255.0, strict=True),
        ToTensorV2(),
    ]
    keypoint_params = A.KeypointParams(format="xy", remove_invisible=False)
    additional = {"clean_image": "image"} if with_clean else None
    return A.Compose(steps, keypoint_params=keypoint_params, additional_targets=additional, strict=True)
