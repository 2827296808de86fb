"""Benchmark protocols: one fixed, versioned definition per benchmark, selected by ``--dataset NAME``.

A protocol says which dataset (and adapter options), which split, which rows count, which group columns and subsets
are reported and what test-time policy applies. A dataset's plain name selects its standard protocol; any other
registered dataset name gets an ad-hoc protocol (its test split, all rows). Changing a definition bumps its version,
so a result always says exactly what it measured.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from fer_bench.data import DatasetInfo, get_dataset, list_datasets
from fer_bench.errors import ConfigError, DataError
from fer_bench.registry import Registry, did_you_mean


@dataclass(frozen=True)
class Protocol:
    """A named, versioned evaluation protocol.

    Attributes:
        name: What ``--dataset`` takes (``rafdb``, ``rafdb-occlusion``, ``affectnet7``, ...).
        version: Bumped whenever anything below changes.
        dataset: The dataset adapter it reads.
        options: Adapter options it fixes (``{"classes": 7}``); the user may add others (paths, votes source).
        split: The split scored.
        subset: A boolean column restricting the rows (``occlusion`` for RAF-DB's occlusion subset), or None.
        group_columns: Group columns reported (None: every group column the dataset declares).
        description: One line for reports.
    """

    name: str
    version: int
    dataset: str
    options: dict[str, Any] = field(default_factory=dict)
    split: str = "test"
    subset: str | None = None
    group_columns: tuple[str, ...] | None = None
    description: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "group_columns": list(self.group_columns) if self.group_columns else None}


PROTOCOLS: Registry[Protocol] = Registry("protocol")
for _p in (
    Protocol("synthfer", 1, "synthfer", description="SynthFER test split, 8 classes, every group attribute"),
    Protocol("rafdb", 1, "rafdb", description="RAF-DB basic test (3,068), 7 classes; gender, race, age"),
    Protocol("rafdb-occlusion", 1, "rafdb", subset="occlusion", description="RAF-DB test, RAN occlusion list (735)"),
    Protocol("rafdb-pose30", 1, "rafdb", subset="pose30", description="RAF-DB test, RAN pose >= 30 deg (1,247)"),
    Protocol("rafdb-pose45", 1, "rafdb", subset="pose45", description="RAF-DB test, RAN pose >= 45 deg (558)"),
    Protocol("affectnet7", 1, "affectnet", {"classes": 7}, description="AffectNet validation set, 7 classes (3,500)"),
    Protocol("affectnet8", 1, "affectnet", {"classes": 8}, description="AffectNet validation set, 8 classes (4,000)"),
    Protocol("ferplus", 1, "ferplus", description="FERPlus test, majority votes (always), 8 classes"),
    Protocol("fer2013", 1, "fer2013", description="FER2013 PrivateTest (3,589), 7 classes"),
    Protocol("infer-cv10", 1, "infer", {"protocol": "cv10"}, description="InFER 10-fold CV, one test fold"),
):
    PROTOCOLS.register(_p.name, _p)


def get_protocol(name: str) -> Protocol:
    """The protocol called ``name``, or an ad-hoc one for a registered dataset name (``folder``, ``csv``, ...)."""
    if name in PROTOCOLS:
        return PROTOCOLS.get(name)
    if name in list_datasets():
        return Protocol(name, 0, name, description=f"{name}: test split, all rows (ad-hoc, not a benchmark)")
    choices = sorted(set(PROTOCOLS.names()) | set(list_datasets()))
    hint = did_you_mean(name, choices)
    raise ConfigError(f"--dataset {name!r}: not a protocol or dataset.{hint} Available: {', '.join(choices)}")


def protocol_of(info: DatasetInfo, options: dict[str, Any] | None = None, *, split: str = "test") -> Protocol:
    """:func:`protocol_for` the dataset ``info`` was read as (with the options its adapter resolved itself, such as
    InFER's split scheme when none was given)."""
    return protocol_for(info.name, {**(options or {}), **info.extras.get("resolved_options", {})}, split=split)


def protocol_for(dataset: str, options: dict[str, Any] | None = None, *, split: str = "test") -> Protocol:
    """The registered protocol a training run on ``dataset`` with adapter ``options`` (defaults included) is scored
    under: the one for that dataset, scoring ``split`` of all rows, whose fixed options the run's agree with (the
    most specific wins: affectnet + classes=7 → ``affectnet7``; infer + protocol=cv10 → ``infer-cv10``); else an
    ad-hoc protocol named after the dataset (version 0).

    Example:
        >>> protocol_for("affectnet", {"classes": 7}).name, protocol_for("rafdb", {}).name
        ('affectnet7', 'rafdb')
    """
    from fer_bench.data import dataset_options

    options = {**dataset_options(dataset), **(options or {})} if dataset in list_datasets() else dict(options or {})
    matching = [
        PROTOCOLS.get(name)
        for name in PROTOCOLS.names()
        if PROTOCOLS.get(name).dataset == dataset
        and PROTOCOLS.get(name).split == split
        and PROTOCOLS.get(name).subset is None
        and all(options.get(k) == v for k, v in PROTOCOLS.get(name).options.items())
    ]
    if matching:
        return max(matching, key=lambda p: len(p.options))
    fixed = ", ".join(f"{k}={v}" for k, v in sorted(options.items())) or "default options"
    return Protocol(
        dataset,
        0,
        dataset,
        dict(options),
        split=split,
        description=f"{dataset} ({fixed}), {split} split, all rows (ad hoc, not a benchmark)",
    )


def list_protocols() -> list[str]:
    return PROTOCOLS.names()


def load_protocol_data(protocol: Protocol, root, options: dict[str, Any] | None = None) -> DatasetInfo:
    """Read the protocol's dataset; user options may add to the protocol's but not contradict them."""
    options = dict(options or {})
    for key, value in protocol.options.items():
        if key in options and options[key] != value:
            raise ConfigError(f"--option {key}={options[key]!r}: protocol {protocol.name!r} fixes {key}={value!r}")
    return get_dataset(protocol.dataset, root, **{**options, **protocol.options})


def protocol_rows(protocol: Protocol, info: DatasetInfo):
    """The rows the protocol scores, in manifest order."""
    rows = info.split(protocol.split)
    if protocol.subset:
        if protocol.subset not in rows.columns or not rows[protocol.subset].any():
            raise DataError(
                f"protocol {protocol.name!r} scores the {protocol.subset!r} subset, but dataset {info.name!r} at "
                f"{info.root} marks no such rows (see the dataset card for the list files it needs)"
            )
        rows = rows[rows[protocol.subset].astype(bool)].reset_index(drop=True)
    return rows


def protocol_data(
    protocol: Protocol,
    *,
    root: str | os.PathLike | None,
    cache: str | os.PathLike | None,
    options: dict[str, Any] | None = None,
) -> DatasetInfo:
    """The protocol's dataset, read from ``root`` or from a prepared ``cache`` of it (exactly one of the two).

    A cache must hold the protocol's dataset, built with options that agree with the protocol's and the user's.

    Raises:
        ConfigError: both or neither given; a cache of another dataset or built with contradicting options.
    """
    from fer_bench.data import check_dataset_options
    from fer_bench.data.cache import open_cache, read_cache_card

    options = dict(options or {})
    if cache is None and root is None:
        raise ConfigError("no data: give --root DIR (the dataset) or --cache FOLDER (a prepared cache of it)")
    if cache is not None and root is not None:
        raise ConfigError("give --root DIR (the dataset) or --cache FOLDER (a prepared cache of it), not both")
    if cache is None:
        return load_protocol_data(protocol, root, options)
    check_dataset_options(protocol.dataset, options)
    for key, value in protocol.options.items():
        if key in options and options[key] != value:
            raise ConfigError(f"--option {key}={options[key]!r}: protocol {protocol.name!r} fixes {key}={value!r}")
    info = open_cache(cache)
    if info.name != protocol.dataset:
        raise ConfigError(
            f"--cache {cache}: holds dataset {info.name!r}, protocol {protocol.name!r} scores {protocol.dataset!r}"
        )
    built_with = read_cache_card(Path(cache))["parameters"].get("options", {})
    for key, value in {**options, **protocol.options}.items():
        if key in built_with and built_with[key] != value:
            raise ConfigError(
                f"--cache {cache}: built with {key}={built_with[key]!r}, protocol {protocol.name!r} needs "
                f"{key}={value!r}"
            )
    return info
