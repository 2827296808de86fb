"""Evaluation: pure metrics, bootstrap, fairness, protocols, inference, results, reports and plots, submissions.

MLflow's flat metric names (``flat_metrics``) live with the tracking, in :mod:`fer_bench.train.tracking`.
"""

from fer_bench.eval.evaluator import evaluate
from fer_bench.eval.head_metrics import EvalHook
from fer_bench.eval.inference import predict
from fer_bench.eval.protocols import Protocol, get_protocol, list_protocols, load_protocol_data, protocol_rows
from fer_bench.eval.report import write_report
from fer_bench.eval.results import compute_results, score

__all__ = [
    "EvalHook",
    "Protocol",
    "compute_results",
    "evaluate",
    "get_protocol",
    "list_protocols",
    "load_protocol_data",
    "predict",
    "protocol_rows",
    "score",
    "write_report",
]
