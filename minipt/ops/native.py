"""``backend="native"``: the pybind11 extension ``minipt._C`` behind each op's contract.

The extension takes raw pointers, shapes and the CUDA stream; this module checks
tensors, makes them contiguous, allocates outputs and wraps forward and backward
in autograd Functions.
"""

from __future__ import annotations

from minipt._backend import BackendUnavailableError


def _missing(op: str):
    raise BackendUnavailableError(f"{op}: backend='native' is not implemented yet")


def attention(q, k, v, *, is_causal, attention_mask, scale):
    _missing("attention")


def mlm_mask(input_ids, *, mask_token_id, vocab_size, special_tokens_mask, mlm_probability, seed):
    _missing("mlm_mask")


def cross_entropy(logits, target, *, ignore_index, reduction, label_smoothing):
    _missing("cross_entropy")


def linear_cross_entropy(hidden, weight, target, *, bias, ignore_index, reduction, label_smoothing):
    _missing("linear_cross_entropy")
