"""Chefer side by side with Captum's methods: one way to run them, one remover, the metrics, the evaluation.

* :mod:`~captum_chefer.comparison.methods`: :func:`compare_methods` (scores and time of several methods
  on the same batches), :func:`ig_baselines`, :class:`EvaluatorMethod` (for PyHealth's ``Evaluator``).
* :mod:`~captum_chefer.comparison.removal`: removing tokens through the model (:class:`TokenRemover`,
  :class:`TokenRemoval` for Captum's ``infidelity``).
* :mod:`~captum_chefer.comparison.metrics`: removal curves, comprehensiveness, sufficiency, localization,
  Captum's infidelity and sensitivity, a random baseline.
* :mod:`~captum_chefer.comparison.evaluate`: :func:`evaluate_methods`, all of it in one call.
* :mod:`~captum_chefer.comparison.stats`: bootstrap intervals over patients, the paired comparison of two
  methods, the binomial test of a model against chance.
* :mod:`~captum_chefer.comparison.tables`: rows to CSV, JSON or Parquet and back (``save`` / ``load``).
"""

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
from .stats import Interval, above_chance, bootstrap_interval, paired_difference

__all__ = [
    "Comparison",
    "DEFAULT_FRACTIONS",
    "DEFAULT_PERCENTAGES",
    "Evaluation",
    "EvaluatorMethod",
    "GroundTruth",
    "Interval",
    "Leader",
    "MethodSpec",
    "Output",
    "RandomAttribution",
    "RemovalCurves",
    "Remover",
    "TokenRemoval",
    "TokenRemover",
    "above_chance",
    "attribution_sensitivity",
    "bootstrap_interval",
    "compare_methods",
    "comprehensiveness",
    "evaluate_methods",
    "explained_output",
    "ig_baselines",
    "is_ig_like",
    "localization_auroc",
    "masked_feature_dict",
    "method_name",
    "method_specs",
    "paired_difference",
    "precision_at_k",
    "rank_codes",
    "removal_curves",
    "sufficiency",
    "token_infidelity",
    "token_removal_perturbation",
]
