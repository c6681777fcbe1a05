"""selfflow: flow-matching transformers that learn their own representations (Self-Flow),
their samplers, one-step students and StableRep, in one PyTorch toolkit."""

__version__ = "0.1.0"
