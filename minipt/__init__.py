"""minipt: small, fast pretraining of GPT and BERT on hand-written kernels."""

__version__ = "0.1.0"
