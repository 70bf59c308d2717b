"""Bound rules, one module per op family. Importing this package fills bcpc.registry."""
from bcpc.rules import activations, affine, pooling, structural

__all__ = ["activations", "affine", "pooling", "structural"]
