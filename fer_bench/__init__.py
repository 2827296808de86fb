"""fer_bench: a facial-expression-recognition benchmark toolkit.

Public entry points live in the sub-packages: ``fer_bench.data`` (datasets, SynthFER), ``fer_bench.models``
(``create_model``), ``fer_bench.train`` (``fit``) and ``fer_bench.eval`` (``evaluate``).
"""

__version__ = "0.1.0"
