"""mnist-distill: train a CNN teacher on MNIST and distill it into small students."""

__version__ = "0.1.0"
