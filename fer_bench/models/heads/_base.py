"""What every head receives about the backbone it is attached to."""

from __future__ import annotations

from dataclasses import dataclass

from fer_bench.errors import ConfigError


@dataclass(frozen=True)
class HeadContext:
    """The backbone's shapes, measured by one dry forward pass at the model's input size.

    Attributes:
        family: ``vit`` or ``swin``.
        num_classes: Size of the label space.
        embed_dim: Width of the pooled embedding.
        img_size: Input side in pixels.
        layer_dims: Channels of each layer's token map.
        layer_grids: (H, W) of each layer's token map.
    """

    family: str
    num_classes: int
    embed_dim: int
    img_size: int
    layer_dims: tuple[int, ...]
    layer_grids: tuple[tuple[int, int], ...]

    @property
    def num_layers(self) -> int:
        return len(self.layer_dims)

    def layer(self, index: int, *, option: str) -> int:
        """``index`` (negative from the end) as a layer number, checked."""
        n = self.num_layers
        if not isinstance(index, int) or not -n <= index < n:
            raise ConfigError(f"{option}={index!r}: the backbone has {n} layers (use 0..{n - 1} or -1..-{n})")
        return index % n


def check_range(option: str, value, low: float, high: float | None = None) -> float:
    """``value`` as a float in [low, high] (high None: no upper bound), else a ConfigError naming the option."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{option}: expected a number, got {value!r}") from None
    if number < low or (high is not None and number > high):
        bound = f"[{low}, {high}]" if high is not None else f">= {low}"
        raise ConfigError(f"{option}: expected a number in {bound}, got {value!r}")
    return number
