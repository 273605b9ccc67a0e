"""Accuracy as an ``evaluate`` metric module, bundled so ``evaluate.load`` needs neither the Hub nor scikit-learn.

``sparse_peft.evaluation.load_metric("accuracy")`` loads this file; any other name goes to ``evaluate.load``.
"""

import datasets
import evaluate


class Accuracy(evaluate.Metric):
    """Fraction of predictions equal to their reference label."""

    def _info(self):
        return evaluate.MetricInfo(
            description="Fraction of predictions equal to the reference label.",
            citation="",
            inputs_description="predictions, references: lists of integer class ids of equal length.",
            features=datasets.Features(
                {"predictions": datasets.Value("int64"), "references": datasets.Value("int64")}
            ),
        )

    def _compute(self, predictions, references):
        correct = sum(int(p == r) for p, r in zip(predictions, references))
        return {"accuracy": correct / len(references)}
