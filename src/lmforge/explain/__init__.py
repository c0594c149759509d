"""`lmforge explain`: why a model gave its score, by integrated gradients, attention, rollout, occlusion and the
logit lens (`methods.py`, one object per method), drawn into one HTML page with PNGs and JSON (`report.py`)."""

from lmforge.explain.methods import METHODS, Explanation, rollout
from lmforge.explain.report import explain
from lmforge.explain.subject import Subject, build_subject

__all__ = ["METHODS", "Explanation", "Subject", "build_subject", "explain", "rollout"]
