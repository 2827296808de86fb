"""Dataset adapters, one self-contained file per dataset; importing this package registers them all.

Every adapter detects the layout it was given by marker files, maps native codes to canonical expression names
with an explicit table (never folder sort order), keeps the native label in ``native_label`` and counts every row
it leaves out by reason in ``DatasetInfo.dropped``.
"""

from fer_bench.data.adapters import affectnet, custom, fer2013, ferplus, infer, rafdb  # noqa: F401

__all__: list[str] = []
