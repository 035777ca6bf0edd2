"""Chefer et al.'s gradient-weighted attention relevance as a Captum attribution, for PyHealth models."""

from .attribution import CheferAttribution
from .pyhealth import PyHealthAdapter

__all__ = ["CheferAttribution", "PyHealthAdapter"]
__version__ = "0.1.0"
