"""fer_bench: a facial-expression-recognition benchmark toolkit.

Public entry points live in the sub-packages: ``fer_bench.data`` (datasets, SynthFER), ``fer_bench.models``
(``create_model``), ``fer_bench.train`` (``fit``) and ``fer_bench.eval`` (``evaluate``).
"""

import os as _os

# No network at run time: albumentations otherwise asks PyPI for a newer version on import (a DNS wait offline).
_os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

__version__ = "0.1.0"
