"""Metrics (numpy only) and reports (Markdown, HTML, PNG) for evaluation results."""

from finegrain.evaluate.metrics import classification_metrics, multilabel_metrics, regression_metrics
from finegrain.evaluate.report import (
    format_report_text,
    plot_confusion_matrix,
    plot_learning_curve,
    write_classification_report,
)

__all__ = [
    "classification_metrics",
    "format_report_text",
    "multilabel_metrics",
    "plot_confusion_matrix",
    "plot_learning_curve",
    "regression_metrics",
    "write_classification_report",
]
