"""dspark: DSpark speculative decoding for the serving stacks teams already run."""

__version__ = "0.1.0"
