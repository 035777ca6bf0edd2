"""Chefer side by side with Captum's methods: one way to run them, one remover, the metrics, the evaluation.

* :mod:`~captum_chefer.comparison.methods`: :func:`compare_methods` (scores and time of several methods
  on the same batches), :func:`ig_baselines`, :class:`EvaluatorMethod` (for PyHealth's ``Evaluator``).
* :mod:`~captum_chefer.comparison.removal`: removing tokens through the model (:class:`TokenRemover`,
  :class:`TokenRemoval` for Captum's ``infidelity``).
* :mod:`~captum_chefer.comparison.metrics`: removal curves, comprehensiveness, sufficiency, localization,
  Captum's infidelity and sensitivity, a random baseline.
* :mod:`~captum_chefer.comparison.evaluate`: :func:`evaluate_methods`, all of it in one call.
* :mod:`~captum_chefer.comparison.stats`: intervals over patients (bootstrap, Wilson), the paired
  comparison of two methods, the binomial test of a model against chance.
* :mod:`~captum_chefer.comparison.chance`: the explained model against always predicting the most frequent
  class (:func:`check_model`, :class:`ModelCheck`, :class:`ChanceLevelWarning`).
* :mod:`~captum_chefer.comparison.tables`: rows to CSV, JSON or Parquet and back (``save`` / ``load``).
"""

from .chance import ChanceLevelWarning, ModelCheck, batch_predictions, check_model, warn_if_chance_level
from .evaluate import Evaluation, GroundTruth, Leader, evaluate_methods
from .methods import (
    Comparison,
    EvaluatorMethod,
    MethodSpec,
    compare_methods,
    ig_baselines,
    is_ig_like,
    masked_feature_dict,
    method_name,
    method_specs,
)
from .metrics import (
    DEFAULT_FRACTIONS,
    DEFAULT_PERCENTAGES,
    RandomAttribution,
    RemovalCurves,
    attribution_sensitivity,
    comprehensiveness,
    localization_auroc,
    precision_at_k,
    rank_codes,
    removal_curves,
    sufficiency,
    token_infidelity,
)
from .removal import Output, Remover, TokenRemoval, TokenRemover, explained_output, token_removal_perturbation
from .stats import Interval, above_chance, bootstrap_interval, mean_interval, paired_difference, wilson_interval

__all__ = [
    "ChanceLevelWarning",
    "Comparison",
    "DEFAULT_FRACTIONS",
    "DEFAULT_PERCENTAGES",
    "Evaluation",
    "EvaluatorMethod",
    "GroundTruth",
    "Interval",
    "Leader",
    "MethodSpec",
    "ModelCheck",
    "Output",
    "RandomAttribution",
    "RemovalCurves",
    "Remover",
    "TokenRemoval",
    "TokenRemover",
    "above_chance",
    "attribution_sensitivity",
    "batch_predictions",
    "bootstrap_interval",
    "check_model",
    "compare_methods",
    "comprehensiveness",
    "evaluate_methods",
    "explained_output",
    "ig_baselines",
    "is_ig_like",
    "localization_auroc",
    "masked_feature_dict",
    "mean_interval",
    "method_name",
    "method_specs",
    "paired_difference",
    "precision_at_k",
    "rank_codes",
    "removal_curves",
    "sufficiency",
    "token_infidelity",
    "token_removal_perturbation",
    "warn_if_chance_level",
    "wilson_interval",
]
