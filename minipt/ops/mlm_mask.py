"""BERT's masked-language-model corruption of a batch of token ids.

Each position that is not special is selected with probability p (0.15). A selected
position keeps its original id in ``labels`` (-100 elsewhere) and, in the input,
becomes [MASK] with probability 0.8, a uniform random id in [0, vocab_size) with
probability 0.1, or stays as it was with probability 0.1.

Memory traffic: read N ids (+ N special flags), write N ids and N labels. The torch
recipe of Hugging Face's collator draws three Bernoulli tensors and makes several
index writes, about 10 passes over N; a fused kernel makes one.
"""

from __future__ import annotations

import torch

from minipt._backend import BackendUnavailableError, resolve_backend
from minipt.ops._checks import INDEX_DTYPES, check_same, check_tensor

OP = "mlm_mask"
IGNORE_INDEX = -100
MASK_FRACTION = 0.8  # of the selected positions, the share that becomes [MASK]
RANDOM_FRACTION = 0.1  # ... and the share that becomes a random id; the rest stay


# ----------------------------------------------------------------------------- reference
def mlm_mask_ref(input_ids, *, mask_token_id, vocab_size, special_tokens_mask=None, mlm_probability=0.15, seed=0):
    """PyTorch reference, drawing from a seeded ``torch.Generator`` on the input's device."""
    gen = torch.Generator(device=input_ids.device).manual_seed(seed)
    select = torch.rand(input_ids.shape, generator=gen, device=input_ids.device) < mlm_probability
    if special_tokens_mask is not None:
        select &= ~special_tokens_mask.bool()
    action = torch.rand(input_ids.shape, generator=gen, device=input_ids.device)
    random_ids = torch.randint(
        0, vocab_size, input_ids.shape, generator=gen, device=input_ids.device, dtype=input_ids.dtype
    )
    labels = torch.where(select, input_ids, torch.full_like(input_ids, IGNORE_INDEX))
    masked = torch.where(select & (action < MASK_FRACTION), torch.full_like(input_ids, mask_token_id), input_ids)
    use_random = select & (action >= MASK_FRACTION) & (action < MASK_FRACTION + RANDOM_FRACTION)
    masked = torch.where(use_random, random_ids, masked)
    return masked, labels


# ----------------------------------------------------------------------------- backends
def _mlm_mask_triton(input_ids, special_tokens_mask, mask_token_id, vocab_size, mlm_probability, seed):
    raise BackendUnavailableError(f"{OP}: backend='triton' is not implemented yet")


# ----------------------------------------------------------------------------- public op
def _check_inputs(input_ids, mask_token_id, vocab_size, special_tokens_mask, mlm_probability, seed) -> None:
    check_tensor(OP, "input_ids", input_ids, dtypes=INDEX_DTYPES)
    if input_ids.dim() == 0:
        raise ValueError(f"{OP}: input_ids must have at least one dimension, got a scalar")
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < 1:
        raise ValueError(f"{OP}: vocab_size must be a positive int, got {vocab_size!r}")
    if input_ids.dtype == torch.int32 and vocab_size > 2**31 - 1:
        raise ValueError(f"{OP}: vocab_size {vocab_size} does not fit the int32 input_ids")
    if isinstance(mask_token_id, bool) or not isinstance(mask_token_id, int) or not 0 <= mask_token_id < vocab_size:
        raise ValueError(f"{OP}: mask_token_id must be an int in [0, vocab_size={vocab_size}), got {mask_token_id!r}")
    if not isinstance(mlm_probability, (int, float)) or not 0.0 <= float(mlm_probability) <= 1.0:
        raise ValueError(f"{OP}: mlm_probability must be a float in [0, 1], got {mlm_probability!r}")
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63:
        raise ValueError(f"{OP}: seed must be an int in [0, 2**63), got {seed!r}")
    if special_tokens_mask is not None:
        check_tensor(OP, "special_tokens_mask", special_tokens_mask, dtypes=(torch.bool, *INDEX_DTYPES, torch.uint8))
        if special_tokens_mask.shape != input_ids.shape:
            raise ValueError(
                f"{OP}: special_tokens_mask must have the shape of input_ids {tuple(input_ids.shape)}, "
                f"got {tuple(special_tokens_mask.shape)}"
            )
        check_same(OP, ("input_ids", input_ids), ("special_tokens_mask", special_tokens_mask), dtype=False)


def mlm_mask(
    input_ids, *, mask_token_id, vocab_size, special_tokens_mask=None, mlm_probability=0.15, seed=0, backend="auto"
):
    """Return ``(masked_input_ids, labels)``; ``input_ids`` is left unchanged."""
    _check_inputs(input_ids, mask_token_id, vocab_size, special_tokens_mask, mlm_probability, seed)
    backend = resolve_backend(backend, input_ids.device, OP)
    if backend == "torch":
        return mlm_mask_ref(
            input_ids, mask_token_id=mask_token_id, vocab_size=vocab_size, special_tokens_mask=special_tokens_mask,
            mlm_probability=mlm_probability, seed=seed,
        )
    if backend == "triton":
        return _mlm_mask_triton(input_ids, special_tokens_mask, mask_token_id, vocab_size, float(mlm_probability), seed)
    from minipt.ops import native

    return native.mlm_mask(
        input_ids, mask_token_id=mask_token_id, vocab_size=vocab_size, special_tokens_mask=special_tokens_mask,
        mlm_probability=float(mlm_probability), seed=seed,
    )
