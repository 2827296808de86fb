"""Evaluation: pure metrics, the evaluator and its reports."""

from fer_bench.eval.evaluator import compute_results, evaluate, predict, write_report

__all__ = ["compute_results", "evaluate", "predict", "write_report"]
