"""Chefer et al.'s gradient-weighted attention relevance as a Captum attribution, for PyHealth and other
transformers."""

from .adapters import HuggingFaceAdapter, PyHealthAdapter, TransformerAdapter, adapter_for
from .attribution import CheferAttribution
from .comparison import ChanceLevelWarning, compare_methods, ig_baselines
from .llm import CheferLLMAttribution

__all__ = [
    "ChanceLevelWarning", "CheferAttribution", "CheferLLMAttribution", "HuggingFaceAdapter", "PyHealthAdapter",
    "TransformerAdapter", "adapter_for", "compare_methods", "ig_baselines",
]
__version__ = "0.1.0"
