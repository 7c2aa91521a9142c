"""hihpq: Hierarchical Hyperbolic Product Quantization for unsupervised image retrieval.

Data flows one way: geometry -> quantizer -> losses -> model -> training -> codes -> index -> evaluation.
The Python entry points: :class:`Encoder` (a trained model as an image encoder), :func:`train_run` (one training
run from a config) and :func:`load_config`; imported on first use, so ``import hihpq`` stays light.
"""

__version__ = "0.1.0"

__all__ = ["Encoder", "load_config", "train_run"]


def __getattr__(name: str):
    if name == "Encoder":
        from hihpq.encoder import Encoder

        return Encoder
    if name == "train_run":
        from hihpq.runs import train_run

        return train_run
    if name == "load_config":
        from hihpq.config import load_config

        return load_config
    raise AttributeError(f"module 'hihpq' has no attribute {name!r}")
