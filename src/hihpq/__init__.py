"""hihpq: Hierarchical Hyperbolic Product Quantization for unsupervised image retrieval.

Data flows one way: geometry -> quantizer -> losses -> model -> training -> codes -> index -> evaluation.
"""

__version__ = "0.1.0"
