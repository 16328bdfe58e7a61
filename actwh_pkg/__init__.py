"""actwh: an activation warehouse for transformer interpretability."""

__version__ = "0.1.0"
