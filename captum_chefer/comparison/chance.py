"""Is the explained model better than chance? Its accuracy against always predicting the most frequent class.

An explanation of a model that has not learned its task explains noise: the comparison's metrics then say
little about the methods. :func:`check_model` measures a model on the explained data; :class:`ModelCheck`
holds the counts, the exact binomial test of :func:`~captum_chefer.comparison.stats.above_chance` and the
Wilson interval of the accuracy; :func:`warn_if_chance_level` emits a :class:`ChanceLevelWarning` for a
model not above chance. ``run_comparison``, ``attribute_dataset`` and ``summarize`` use them, and the
command line prints the warning.

Silence it, where a chance-level model is meant (a smoke test), with
``warnings.filterwarnings("ignore", category=ChanceLevelWarning)``.

Example (12 explained patients, 6 of each class, 5 predicted right):
    >>> check = ModelCheck.from_counts(correct=5, n=12, class_counts={0: 6, 1: 6})
    >>> check.majority_rate, check.above_chance
    (0.5, False)
    >>> check.describe()
    'accuracy 0.417 (5 of 12 explained patients, 95% interval [0.193, 0.680]); always predicting the most frequent class scores 0.500 (one-sided binomial p = 0.806)'
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Optional

import torch
from torch import Tensor

from .stats import Interval, above_chance, wilson_interval

__all__ = ["ChanceLevelWarning", "ModelCheck", "batch_predictions", "check_model", "warn_if_chance_level"]


class ChanceLevelWarning(UserWarning):
    """The explained model is not better than always predicting the most frequent class.

    Emitted by ``run_comparison``, ``attribute_dataset`` and ``summarize``; the message holds the numbers
    (:meth:`ModelCheck.warning`).
    """


@dataclass(frozen=True)
class ModelCheck:
    """The model's accuracy on the explained samples, against always predicting the most frequent class.

    Attributes:
        n: samples with a label; correct: those predicted right; majority_rate: the share of the most
        frequent true class; p_value: one-sided exact binomial test of ``accuracy > majority_rate``;
        above_chance: ``p_value < 0.05``; unit: what the samples are, in the sentences
        (``"explained patients"``, ``"samples"``).
    """

    n: int
    correct: int
    majority_rate: float
    p_value: float
    above_chance: bool
    unit: str = "explained patients"

    @classmethod
    def from_counts(
        cls, correct: int, n: int, class_counts: Mapping[Any, int], *, unit: str = "explained patients"
    ) -> "ModelCheck":
        """The check from counts: ``correct`` of ``n`` right, ``class_counts`` the true classes' counts."""
        if n <= 0 or not 0 <= correct <= n or sum(class_counts.values()) != n:
            raise ValueError(
                f"need 0 <= correct <= n, n > 0 and class counts summing to n; got correct={correct}, n={n}, "
                f"class_counts={dict(class_counts)}"
            )
        majority = max(class_counts.values()) / n
        above, p_value = above_chance(correct, n, majority)
        return cls(int(n), int(correct), majority, p_value, above, unit)

    @classmethod
    def from_predictions(cls, labels: Tensor, predicted: Tensor, *, unit: str = "explained patients") -> "ModelCheck":
        """The check from the true and the predicted classes (1-D integer tensors of the same length)."""
        labels, predicted = labels.reshape(-1).long(), predicted.reshape(-1).long()
        counts = torch.bincount(labels)
        return cls.from_counts(
            int((labels == predicted).sum()), int(labels.numel()),
            {i: int(c) for i, c in enumerate(counts.tolist()) if c}, unit=unit,
        )

    @property
    def accuracy(self) -> float:
        return self.correct / self.n

    @property
    def interval(self) -> Interval:
        """The accuracy's 95% Wilson score interval (:func:`~captum_chefer.comparison.stats.wilson_interval`)."""
        return wilson_interval(self.correct, self.n)

    def describe(self) -> str:
        """One sentence with the numbers."""
        interval = self.interval
        return (
            f"accuracy {self.accuracy:.3f} ({self.correct} of {self.n} {self.unit}, 95% interval "
            f"[{interval.low:.3f}, {interval.high:.3f}]); always predicting the most frequent class scores "
            f"{self.majority_rate:.3f} (one-sided binomial p = {self.p_value:.3g})"
        )

    def warning(self) -> str:
        """The warning a chance-level model gets (empty when the model is above chance)."""
        if self.above_chance:
            return ""
        return (
            f"The model is not better than chance on the {self.unit}: {self.describe()}. Explanations of a model "
            "that has not shown it learned the task say little about the data or about the methods; train it "
            "further (more epochs or patients) and explain again."
        )

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready, the warning included (``None`` above chance); :meth:`from_dict` reads it back."""
        interval = self.interval
        return {
            "n": self.n, "correct": self.correct, "accuracy": self.accuracy, "accuracy_low": interval.low,
            "accuracy_high": interval.high, "majority_rate": self.majority_rate, "p_value": self.p_value,
            "above_chance": self.above_chance, "unit": self.unit, "warning": self.warning() or None,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "ModelCheck":
        return cls(int(data["n"]), int(data["correct"]), float(data["majority_rate"]), float(data["p_value"]),
                   bool(data["above_chance"]), str(data.get("unit", "explained patients")))


def batch_predictions(adapter: Any, batch: Mapping[str, Any], logits: Optional[Tensor] = None) -> Optional[tuple[Tensor, Tensor]]:
    """``(true classes, predicted classes)`` of a batch, on the CPU; ``None`` where there is nothing to check.

    Binary and multiclass PyHealth models with the label in the batch (``adapter.label_key``); a binary
    model's single logit predicts class 1 from 0 up. Multilabel models, adapters without a label key and
    batches without the label give ``None``. ``logits``: the model's output on the batch, when already
    computed.
    """
    label_key = getattr(adapter, "label_key", None)
    mode = getattr(getattr(adapter, "model", None), "mode", None)
    if label_key is None or mode not in ("binary", "multiclass") or label_key not in batch:
        return None
    if logits is None:
        tokens, args = adapter.captum_inputs(batch, level="token")
        with torch.no_grad():
            logits = adapter(*tokens, *args)
    logits = logits.detach().float().cpu()
    predicted = (logits[:, 0] >= 0).long() if logits.shape[1] == 1 else logits.argmax(1)
    labels = torch.as_tensor(batch[label_key]).detach().cpu().reshape(-1).long()
    return labels, predicted


def check_model(
    adapter: Any, data: Mapping[str, Any] | Iterable[Mapping[str, Any]], *, unit: str = "explained patients"
) -> Optional[ModelCheck]:
    """Accuracy of the model on ``data`` (a batch dict or a ``DataLoader``) against the most frequent class.

    ``None`` where :func:`batch_predictions` has nothing to check (multilabel models, batches without
    labels, adapters of other libraries).
    """
    labels, predicted = [], []
    for batch in [data] if isinstance(data, Mapping) else data:
        pair = batch_predictions(adapter, batch)
        if pair is None:
            return None
        labels.append(pair[0])
        predicted.append(pair[1])
    if not labels:
        return None
    return ModelCheck.from_predictions(torch.cat(labels), torch.cat(predicted), unit=unit)


def warn_if_chance_level(check: Optional[ModelCheck], stacklevel: int = 2) -> None:
    """Emit a :class:`ChanceLevelWarning` when ``check`` says the model is not above chance.

    ``stacklevel`` counts from the caller of this function, as :func:`warnings.warn` does.
    """
    if check is not None and not check.above_chance:
        warnings.warn(ChanceLevelWarning(check.warning()), stacklevel=stacklevel + 1)
