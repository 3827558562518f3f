"""BERT's masked-language-model corruption of a batch of token ids.

Each position that is not special is selected with probability p (0.15). A selected
position keeps its original id in ``labels`` (-100 elsewhere) and, in the input,
becomes [MASK] with probability 0.8, a uniform random id in [0, vocab_size) with
probability 0.1, or stays as it was with probability 0.1.

Memory traffic: read N ids (+ N special flags), write N ids and N labels. The torch
recipe of Hugging Face's collator draws three Bernoulli tensors and makes several
index writes, about 10 passes over N; a fused kernel makes one.

One stream, every backend. The draws are a pure function of (seed, element index),
so torch, Triton, C++ and CUDA give the same output bit for bit, on any device, for
any block size or thread count; a run resumed on another backend continues with
the masks it would have drawn. The stream, defined by :func:`mlm_mask_ref`:

* Philox4x32-10 (Salmon et al., SC'11; Random123's constants) keyed by
  (seed mod 2**32, seed >> 32). Element i is the flat row-major index of the
  logical shape, so a non-contiguous view masks as its contiguous copy would.
* Selection: elements go in groups of four. Counter (g mod 2**32, g >> 32, 0, 0)
  of group g = i // 4 gives four words, word i % 4 for element i; its top 24 bits
  u are uniform on [0, 2**24), and i is selected when u < round(p · 2**24) and it
  is not special (p's resolution is 2**-24; p = 0 and p = 1 are exact).
* Action: counter (i mod 2**32, i >> 32, 1, 0) gives words a0..a3. With u = the
  top 24 bits of a0, a selected element becomes [MASK] when u < 13421773
  (round(0.8 · 2**24)), a random id when u < 15099494 (round(0.9 · 2**24)), and
  stays otherwise. The random id is floor(r · vocab_size / 2**64) with
  r = a1 · 2**32 + a2 (Lemire's multiply-shift; its bias is below vocab_size / 2**64,
  so any vocab_size an int64 id can hold is fair).

Why groups for selection and a separate call for the action: the native kernels
branch per element, so they pay one Philox call per four elements for selection
and a second only for the ~15% they select, 0.4 calls per element, and Philox is
most of their time (the C++ kernel is ~9x Hugging Face's recipe on a 2-core CPU,
bench/native_cpu.py). The reference and the Triton kernel do not branch: they draw
the action for every element (1.25 calls per element) and an unselected element
ignores it, which changes no bit. Every threshold is an integer compared with an
integer, so no backend rounds differently; the native kernels receive p as
round(p · 2**24) / 2**24, exact in float32.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from minipt.ops._backend import resolve_backend
from minipt.ops._checks import INDEX_DTYPES, check_same, check_tensor
from minipt.ops._loss import IGNORE_INDEX
from minipt.ops._native import check_contiguous, check_device, run_kernel
from minipt.ops._triton import jit, tl, triton, triton_op

OP = "mlm_mask"
MASK_FRACTION = 0.8  # of the selected positions, the share that becomes [MASK]
RANDOM_FRACTION = 0.1  # ... and the share that becomes a random id; the rest stay
UNIFORM_BITS = 24  # bits of each uniform draw; thresholds are integers in [0, 2**24]
GROUP = 4  # elements that share one selection draw
WORD = 0xFFFFFFFF
# Philox4x32's round multipliers and key increments (Random123, kernels/philox.h).
PHILOX_M0, PHILOX_M1 = 0xD2511F53, 0xCD9E8D57
PHILOX_W0, PHILOX_W1 = 0x9E3779B9, 0xBB67AE85


def uniform_threshold(p: float) -> int:
    """The integer t with P(u < t) = p rounded to 2**-24, for u uniform on [0, 2**24)."""
    return round(p * 2**UNIFORM_BITS)


MASK_BELOW = uniform_threshold(MASK_FRACTION)  # 13421773
RANDOM_BELOW = uniform_threshold(MASK_FRACTION + RANDOM_FRACTION)  # 15099494


# ----------------------------------------------------------------------------- reference
# 32-bit words live in int64 tensors, where every operation below is exact on any
# device; the one product that could pass 2**63 is split. Fresh temporaries are
# updated in place: on the CPU each new 1 MiB tensor of a (256, 512) batch costs
# an allocation and its page faults, and in-place updates make Philox 1.6x faster.
def _mulhilo32(a: Tensor, m: int) -> tuple[Tensor, Tensor]:
    """(high, low) words of a · m, a a tensor of words and m a 32-bit constant."""
    # a · m reaches 2**64, past int64: multiply by m's 16-bit halves (each < 2**48).
    low_part, high_part = a * (m & 0xFFFF), a * (m >> 16)
    high = (low_part >> 16).add_(high_part).bitwise_right_shift_(16)
    low = (high_part & 0xFFFF).bitwise_left_shift_(16).add_(low_part).bitwise_and_(WORD)
    return high, low


def philox4x32_10(c0: Tensor, c1: Tensor, c2: Tensor, c3: Tensor, k0: int, k1: int) -> tuple[Tensor, ...]:
    """Philox4x32-10 of counters (c0, c1, c2, c3) (int64 tensors of 32-bit words) under key (k0, k1)."""
    for _ in range(10):
        high0, low0 = _mulhilo32(c0, PHILOX_M0)
        high1, low1 = _mulhilo32(c2, PHILOX_M1)
        c0, c1, c2, c3 = high1.bitwise_xor_(c1).bitwise_xor_(k0), low1, high0.bitwise_xor_(c3).bitwise_xor_(k1), low0
        k0, k1 = (k0 + PHILOX_W0) & WORD, (k1 + PHILOX_W1) & WORD
    return c0, c1, c2, c3


def _mulhi64(high: Tensor, low: Tensor, n: int) -> Tensor:
    """floor(r · n / 2**64) for r = high · 2**32 + low (words) and 0 < n < 2**63."""
    n_high, n_low = n >> 32, n & WORD
    t_high, _ = _mulhilo32(low, n_low)
    u_high, u_low = _mulhilo32(high, n_low)
    u_low = u_low + t_high
    u_high, u_low = u_high + (u_low >> 32), u_low & WORD
    v_high, v_low = _mulhilo32(low, n_high)
    v_high = v_high + ((v_low + u_low) >> 32)
    # high · n_high < 2**63, and so is the sum: it is the result, which is below n.
    return high * n_high + u_high + v_high


def mlm_mask_ref(input_ids, *, mask_token_id, vocab_size, special_tokens_mask=None, mlm_probability=0.15, seed=0):
    """PyTorch reference: defines the stream every backend reproduces (see the header)."""
    ids = input_ids.reshape(-1)  # (N,), read N
    n, device = ids.numel(), ids.device
    k0, k1 = seed & WORD, seed >> 32
    group = torch.arange(-(-n // GROUP), device=device, dtype=torch.int64)  # (N/4,)
    none = torch.zeros_like(group)
    select_words = torch.stack(philox4x32_10(group & WORD, group >> 32, none, none, k0, k1), dim=1).view(-1)[:n]
    selected = (select_words >> 8) < uniform_threshold(mlm_probability)
    if special_tokens_mask is not None:
        selected &= special_tokens_mask.reshape(-1) == 0  # read N
    index = torch.arange(n, device=device, dtype=torch.int64)
    action_words = philox4x32_10(index & WORD, index >> 32, torch.ones_like(index), torch.zeros_like(index), k0, k1)
    action = action_words[0] >> 8
    random_ids = _mulhi64(action_words[1], action_words[2], vocab_size).to(ids.dtype)
    labels = torch.where(selected, ids, IGNORE_INDEX)  # write N
    masked = torch.where(selected & (action < MASK_BELOW), mask_token_id, ids)
    masked = torch.where(selected & (action >= MASK_BELOW) & (action < RANDOM_BELOW), random_ids, masked)  # write N
    return masked.view(input_ids.shape), labels.view(input_ids.shape)


# ----------------------------------------------------------------------------- kernel
# Not specialised: Triton would turn a seed or vocab_size of 1 into a constant and
# compile a kernel per seed value.
@jit(do_not_specialize=["seed", "vocab_size"])
def _mlm_mask_kernel(
    Ids_ptr, Special_ptr, Out_ptr, Labels_ptr,
    n_elements, seed, select_below, mask_below, random_below, mask_token_id, vocab_size,
    HAS_SPECIAL: tl.constexpr, GROUPS: tl.constexpr,
):
    # A block is GROUPS selection groups of four elements: one Philox call per group
    # for the selection words, one per element for the action.
    # int64 indices: a batch may pass 2**31 elements, and the counters take the high word.
    group = tl.program_id(0).to(tl.int64) * GROUPS + tl.arange(0, GROUPS)  # (G,)
    lane = tl.arange(0, 4)[None, :]  # (1, 4)
    offs = group[:, None] * 4 + lane  # (G, 4)
    in_bounds = offs < n_elements
    ids = tl.load(Ids_ptr + offs, mask=in_bounds, other=0)

    zero = tl.zeros_like(group).to(tl.uint32)
    s0, s1, s2, s3 = tl.philox(seed, group.to(tl.uint32), (group >> 32).to(tl.uint32), zero, zero, 10)
    # Element i takes word i % 4 of its group's draw.
    first_pair = tl.where(lane == 0, s0[:, None], s1[:, None])
    second_pair = tl.where(lane == 2, s2[:, None], s3[:, None])
    word = tl.where(lane < 2, first_pair, second_pair)  # (G, 4)
    selected = (word >> 8).to(tl.int32) < select_below
    if HAS_SPECIAL:
        special = tl.load(Special_ptr + offs, mask=in_bounds, other=1)
        selected = selected & (special == 0)

    zeros = tl.zeros_like(offs).to(tl.uint32)
    a0, a1, a2, _ = tl.philox(seed, offs.to(tl.uint32), (offs >> 32).to(tl.uint32), zeros + 1, zeros, 10)
    action = (a0 >> 8).to(tl.int32)
    r = (a1.to(tl.uint64) << 32) | a2.to(tl.uint64)
    random_id = tl.umulhi(r, vocab_size.to(tl.uint64)).to(ids.dtype)

    labels = tl.where(selected, ids, -100)
    out = tl.where(selected & (action < mask_below), mask_token_id, ids)
    out = tl.where(selected & (action >= mask_below) & (action < random_below), random_id, out)
    tl.store(Out_ptr + offs, out.to(ids.dtype), mask=in_bounds)
    tl.store(Labels_ptr + offs, labels.to(ids.dtype), mask=in_bounds)


# ----------------------------------------------------------------------------- launcher
# A triton_op is an operator torch.compile keeps whole (no graph break) and sees
# into; wrap_triton makes the launch traceable.
@triton_op("minipt::triton_mlm_mask", mutates_args=())
def _mlm_mask_triton(
    input_ids: Tensor, special_tokens_mask: Optional[Tensor], mask_token_id: int, vocab_size: int,
    mlm_probability: float, seed: int,
) -> tuple[Tensor, Tensor]:
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
        GROUPS = 256
        torch.library.wrap_triton(_mlm_mask_kernel)[(triton.cdiv(n, GROUPS * GROUP),)](
            ids, special, out, labels,
            n, seed, uniform_threshold(mlm_probability), MASK_BELOW, RANDOM_BELOW, mask_token_id, vocab_size,
            HAS_SPECIAL=special_tokens_mask is not None, GROUPS=GROUPS, num_warps=4,
        )
    return out.view(input_ids.shape), labels.view(input_ids.shape)


# ----------------------------------------------------------------------------- native
@torch.library.custom_op("minipt::native_mlm_mask", mutates_args=())
def native_mlm_mask_op(
    input_ids: Tensor, special_tokens_mask: Optional[Tensor], mask_token_id: int, vocab_size: int,
    mlm_probability: float, seed: int,
) -> tuple[Tensor, Tensor]:
    """(masked ids, labels), both shaped and typed like input_ids; see minipt.ops.mlm_mask."""
    named = [("input_ids", input_ids)]
    if special_tokens_mask is not None:
        named.append(("special_tokens_mask", special_tokens_mask))
    check_device(OP, *named)
    check_contiguous(OP, *named)
    if input_ids.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"{OP}: input_ids must be int32 or int64, got {input_ids.dtype}")
    if special_tokens_mask is not None:
        if special_tokens_mask.shape != input_ids.shape:
            raise ValueError(
                f"{OP}: special_tokens_mask must have shape {tuple(input_ids.shape)}, "
                f"got {tuple(special_tokens_mask.shape)}"
            )
        if special_tokens_mask.dtype not in (torch.bool, torch.uint8, torch.int32, torch.int64):
            raise TypeError(
                f"{OP}: special_tokens_mask must be bool, uint8, int32 or int64, got {special_tokens_mask.dtype}"
            )
    masked, labels = torch.empty_like(input_ids), torch.empty_like(input_ids)
    run_kernel(
        "mlm_mask", input_ids.device, input_ids=input_ids.data_ptr(),
        special=0 if special_tokens_mask is None else special_tokens_mask.data_ptr(),
        special_size=0 if special_tokens_mask is None else special_tokens_mask.element_size(),
        masked=masked.data_ptr(), labels=labels.data_ptr(), numel=input_ids.numel(), id_size=input_ids.element_size(),
        mask_token_id=mask_token_id, vocab_size=vocab_size,
        # The kernel compares u < ceil(p · 2**24) with p in float32: a multiple of
        # 2**-24 is exact there, so this is the reference's threshold exactly.
        mlm_probability=uniform_threshold(mlm_probability) / 2**UNIFORM_BITS, seed=seed,
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
    # Random ids are drawn below vocab_size and stored as input_ids' dtype.
    max_vocab = torch.iinfo(input_ids.dtype).max
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or not 1 <= vocab_size <= max_vocab:
        raise ValueError(
            f"{OP}: vocab_size must be a positive int <= {max_vocab} (the largest {input_ids.dtype} id), "
            f"got {vocab_size!r}"
        )
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
    """Return ``(masked_input_ids, labels)``; ``input_ids`` is left unchanged.

    The same seed and input give the same output, bit for bit, on every backend and device.
    """
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
