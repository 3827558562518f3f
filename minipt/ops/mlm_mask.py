"""BERT's masked-language-model corruption of a batch of token ids.

Each position that is not special is selected with probability p (0.15). A selected
position keeps its original id in ``labels`` (-100 elsewhere) and, in the input,
becomes [MASK] with probability 0.8, a uniform random id in [0, vocab_size) with
probability 0.1, or stays as it was with probability 0.1.

Memory traffic: read N ids (+ N special flags), write N ids and N labels. The torch
recipe of Hugging Face's collator draws three Bernoulli tensors and makes several
index writes, about 10 passes over N; a fused kernel makes one.

The Triton kernel draws from Philox keyed on ``seed`` with the flat element index
as the counter, so the result does not depend on the block size or the launch,
and a position's draws never depend on its neighbours. One Philox call gives four
independent 32-bit words per position: word 0 decides selection, word 1 the
action, word 2 the random id. Probabilities become integer thresholds on 24-bit
uniforms (resolution 2**-24), which makes p = 0 and p = 1 exact. The random id is
the high half of word2 · vocab_size (Lemire's multiply-shift; its bias is below
vocab_size / 2**32). The kernel draws its own stream, so it agrees with the
reference in distribution, not element by element.
"""

from __future__ import annotations

import torch

from minipt._backend import resolve_backend
from minipt.ops._checks import INDEX_DTYPES, check_same, check_tensor
from minipt.ops._triton import constexpr, jit, tl, triton

OP = "mlm_mask"
IGNORE_INDEX = -100
MASK_FRACTION = 0.8  # of the selected positions, the share that becomes [MASK]
RANDOM_FRACTION = 0.1  # ... and the share that becomes a random id; the rest stay


# ----------------------------------------------------------------------------- reference
def mlm_mask_ref(input_ids, *, mask_token_id, vocab_size, special_tokens_mask=None, mlm_probability=0.15, seed=0):
    """PyTorch reference, drawing from a seeded ``torch.Generator`` on the input's device."""
    if input_ids.device.type == "cpu":
        # The CPU generator (mt19937) keeps only the low 32 bits of its seed; fold the
        # high word in, so seeds that differ only above bit 31 still draw different masks.
        seed = (seed ^ (seed >> 32)) & 0xFFFFFFFF
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


# ----------------------------------------------------------------------------- kernel
UNIFORM_BITS = constexpr(24)  # bits of each uniform draw; thresholds are integers in [0, 2**24]


# Not specialised: Triton would turn a seed or vocab_size of 1 into a constant and
# compile a kernel per seed value.
@jit(do_not_specialize=["seed", "vocab_size"])
def _mlm_mask_kernel(
    Ids_ptr, Special_ptr, Out_ptr, Labels_ptr,
    n_elements, seed, select_threshold, mask_threshold, random_threshold, mask_token_id, vocab_size,
    HAS_SPECIAL: tl.constexpr, BLOCK: tl.constexpr,
):
    # int64 offsets: a batch of tokens may exceed 2**31 elements, and the Philox
    # counter takes the high word too, so large batches do not repeat draws.
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    in_bounds = offs < n_elements
    ids = tl.load(Ids_ptr + offs, mask=in_bounds, other=0)

    r_select, r_action, r_id, _ = tl.randint4x(seed, offs)
    u_select = (r_select.to(tl.uint32, bitcast=True) >> (32 - UNIFORM_BITS)).to(tl.int32)
    u_action = (r_action.to(tl.uint32, bitcast=True) >> (32 - UNIFORM_BITS)).to(tl.int32)
    random_id = tl.umulhi(r_id.to(tl.uint32, bitcast=True), vocab_size.to(tl.uint32)).to(ids.dtype)

    selected = u_select < select_threshold
    if HAS_SPECIAL:
        special = tl.load(Special_ptr + offs, mask=in_bounds, other=1)
        selected = selected & (special == 0)

    labels = tl.where(selected, ids, -100)
    out = tl.where(selected & (u_action < mask_threshold), mask_token_id, ids)
    use_random = selected & (u_action >= mask_threshold) & (u_action < random_threshold)
    out = tl.where(use_random, random_id, out)
    tl.store(Out_ptr + offs, out.to(ids.dtype), mask=in_bounds)
    tl.store(Labels_ptr + offs, labels.to(ids.dtype), mask=in_bounds)


# ----------------------------------------------------------------------------- launcher
def _uniform_threshold(p: float) -> int:
    """Integer t with P(u < t) = p for u uniform on the 24-bit integers."""
    return round(p * 2**UNIFORM_BITS.value)


def _mlm_mask_triton(input_ids, special_tokens_mask, mask_token_id, vocab_size, mlm_probability, seed):
    if vocab_size > 2**32 - 1:
        raise ValueError(
            f"{OP}: backend='triton' draws random ids from 32 bits; vocab_size must be < 2**32, got {vocab_size}"
        )
    ids = input_ids.contiguous().view(-1)
    out = torch.empty_like(ids)
    labels = torch.empty_like(ids)
    special = ids  # any pointer; HAS_SPECIAL=False never reads it
    if special_tokens_mask is not None:
        special = special_tokens_mask.contiguous().view(-1)
        if special.dtype == torch.bool:
            special = special.view(torch.uint8)
    n = ids.numel()
    if n > 0:
        BLOCK = 1024
        _mlm_mask_kernel[(triton.cdiv(n, BLOCK),)](
            ids, special, out, labels,
            n, seed, _uniform_threshold(mlm_probability), _uniform_threshold(MASK_FRACTION),
            _uniform_threshold(MASK_FRACTION + RANDOM_FRACTION), mask_token_id, vocab_size,
            HAS_SPECIAL=special_tokens_mask is not None, BLOCK=BLOCK, num_warps=4,
        )
    return out.view(input_ids.shape), labels.view(input_ids.shape)


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


def masked_positions(labels: torch.Tensor, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """Flat indices (int64) of the positions that carry a label, for running the MLM head only there.

    ``hidden.view(-1, D)[masked_positions(labels)]`` and ``labels.view(-1)[...]`` pair up.
    This costs one host sync, since the number of positions decides the output's shape.
    """
    check_tensor("masked_positions", "labels", labels, dtypes=INDEX_DTYPES)
    return (labels.reshape(-1) != ignore_index).nonzero().view(-1)
