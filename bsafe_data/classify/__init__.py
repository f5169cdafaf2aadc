"""Classifiers that score text, and the filter rules that turn scores into keep/reject."""

from bsafe_data.classify.base import Classifier, Score

__all__ = ["Classifier", "Score"]
