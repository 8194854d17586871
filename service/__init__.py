"""lrq: a distributed batch service for regression-training experiments."""

__version__ = "0.1.0"
