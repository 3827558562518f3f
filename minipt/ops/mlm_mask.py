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

import math
from typing import Optional

import torch

from minipt.ops._backend import resolve_backend
from minipt.ops._native import check_contiguous, check_device, run_kernel
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


# ----------------------------------------------------------------------------- native
@torch.library.custom_op("minipt::native_mlm_mask", mutates_args=())
def native_mlm_mask_op(
    input_ids: torch.Tensor, special_tokens_mask: Optional[torch.Tensor], mask_token_id: int, vocab_size: int,
    mlm_probability: float, seed: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(masked ids, labels), both shaped and typed like input_ids; see minipt.ops.mlm_mask."""
    op = "mlm_mask"
    named = [("input_ids", input_ids)]
    if special_tokens_mask is not None:
        named.append(("special_tokens_mask", special_tokens_mask))
    check_device(op, *named)
    check_contiguous(op, *named)
    if input_ids.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"{op}: input_ids must be int32 or int64, got {input_ids.dtype}")
    if special_tokens_mask is not None:
        if special_tokens_mask.shape != input_ids.shape:
            raise ValueError(
                f"{op}: special_tokens_mask must have shape {tuple(input_ids.shape)}, "
                f"got {tuple(special_tokens_mask.shape)}"
            )
        if special_tokens_mask.dtype not in (torch.bool, torch.uint8, torch.int32, torch.int64):
            raise TypeError(
                f"{op}: special_tokens_mask must be bool, uint8, int32 or int64, got {special_tokens_mask.dtype}"
            )
    masked, labels = torch.empty_like(input_ids), torch.empty_like(input_ids)
    run_kernel(
        "mlm_mask", input_ids.device, input_ids=input_ids.data_ptr(),
        special=0 if special_tokens_mask is None else special_tokens_mask.data_ptr(),
        special_size=0 if special_tokens_mask is None else special_tokens_mask.element_size(),
        masked=masked.data_ptr(), labels=labels.data_ptr(), numel=input_ids.numel(), id_size=input_ids.element_size(),
        mask_token_id=mask_token_id, vocab_size=vocab_size, mlm_probability=mlm_probability, seed=seed,
    )
    return masked, labels


@native_mlm_mask_op.register_fake
def _(input_ids, special_tokens_mask, mask_token_id, vocab_size, mlm_probability, seed):
    return torch.empty_like(input_ids), torch.empty_like(input_ids)


def _mlm_mask_native(input_ids, *, mask_token_id, vocab_size, special_tokens_mask, mlm_probability, seed):
    if special_tokens_mask is not None:
        special_tokens_mask = special_tokens_mask.contiguous()
    return native_mlm_mask_op(
        input_ids.contiguous(), special_tokens_mask, mask_token_id, vocab_size, float(mlm_probability), seed
    )


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
    return _mlm_mask_native(
        input_ids, mask_token_id=mask_token_id, vocab_size=vocab_size, special_tokens_mask=special_tokens_mask,
        mlm_probability=float(mlm_probability), seed=seed,
    )


def masked_capacity(n_positions: int, mlm_probability: float) -> int:
    """A bound on the selected positions among ``n_positions`` that is practically never passed.

    The count is Binomial(n, p): the bound is its mean plus 8 standard deviations
    plus 8 (odds of overflow below 1e-15 at any n), rounded up to a multiple of 64
    so the MLM head's GEMM stays on whole tiles, and never more than n.
    """
    mean = n_positions * mlm_probability
    bound = mean + 8.0 * math.sqrt(mean * (1.0 - mlm_probability)) + 8.0
    return min(n_positions, -(-math.ceil(bound) // 64) * 64)


def masked_positions(labels: torch.Tensor, capacity: int, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """Flat indices (int64, shape ``(capacity,)``) of the positions that carry a label.

    Shape-static, so it costs no host sync and compiles without a graph break:
    the labelled positions come first, in order, and the rest of the slots repeat
    index 0 (the caller masks them out by their ``ignore_index`` targets, as
    ``labels.view(-1)[index]`` with the padding slots set to ``ignore_index``).
    More labelled positions than ``capacity`` would drop some silently; that
    raises instead, through an assert that runs on the device (no sync), so a
    CUDA run stops with a device-side assertion and a CPU run with a RuntimeError.
    """
    check_tensor("masked_positions", "labels", labels, dtypes=INDEX_DTYPES)
    if isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < 1:
        raise ValueError(f"masked_positions: capacity must be a positive int, got {capacity!r}")
    labelled = labels.reshape(-1) != ignore_index  # (N,)
    torch._assert_async(
        labelled.sum() <= capacity,
        "masked_positions: more labelled positions than capacity; raise the capacity (see masked_capacity)",
    )
    return torch.nonzero_static(labelled, size=capacity, fill_value=0).view(-1)  # (capacity,)
