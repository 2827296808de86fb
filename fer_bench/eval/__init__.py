"""Evaluation: pure metrics, bootstrap, fairness, protocols, the evaluator and its reports, submissions."""

from fer_bench.eval.evaluator import EvalHook, compute_results, evaluate, flat_metrics, predict, score, write_report
from fer_bench.eval.protocols import Protocol, get_protocol, list_protocols, load_protocol_data, protocol_rows

__all__ = [
    "EvalHook",
    "Protocol",
    "compute_results",
    "evaluate",
    "flat_metrics",
    "get_protocol",
    "list_protocols",
    "load_protocol_data",
    "predict",
    "protocol_rows",
    "score",
    "write_report",
]
