"""Bound rules, one module per op family. Importing this package fills bcpc.registry."""
from bcpc.rules import activations, affine, layout, pooling, smooth, sorting, structural

__all__ = ["activations", "affine", "layout", "pooling", "smooth", "sorting", "structural"]
