"""MLM masking of a batch of token ids: minipt's fused kernels against Hugging Face's torch recipe.

The baseline, ``hf-recipe``, is the logic of ``DataCollatorForLanguageModeling.torch_mask_tokens``
(three Bernoulli draws and a handful of index writes, about ten passes over the
batch), run on the same device as the kernels. ``torch`` is minipt's reference
(``backend="torch"``), ``triton`` the fused kernel (CUDA only), ``native`` the
C++/CUDA one; from the same seed these three draw the same masks, bit for bit, so
they time the same work. ``copy`` is ``torch.clone`` of a buffer that moves as many bytes as
the kernel must (read ids and the special mask, write ids and labels): the
bandwidth a one-pass kernel can hope for, measured on this device.

gbps counts those ideal bytes for every provider, so it is an effective
bandwidth; ``copy_fraction`` is a provider's gbps over the copy's, and ``ratio``
is the recipe's time over the provider's. CPU figures say nothing about a GPU.
"""

from __future__ import annotations

import torch

from bench.common import add_ratios, cli, peak_memory_bytes, time_ms
from minipt.ops import BackendUnavailableError, mlm_mask

BASELINE = "hf-recipe"
PROVIDERS = (BASELINE, "torch", "triton", "native", "copy")
VOCAB, MASK_ID, CLS_ID, SEP_ID, PAD_ID = 30522, 103, 101, 102, 0  # bert-base-uncased
MLM_PROBABILITY = 0.15

GPU_SIZES = ((256, 512), (4096, 2048))
CPU_SIZES = ((256, 512), (2048, 512))


def hf_torch_mask_tokens(input_ids, special_tokens_mask, *, mask_token_id, vocab_size, mlm_probability, generator=None):
    """Hugging Face's ``torch_mask_tokens`` (transformers 4.x), on a copy of the ids rather than in place."""
    labels = input_ids.clone()
    inputs = input_ids.clone()
    device = input_ids.device
    probability_matrix = torch.full(labels.shape, mlm_probability, device=device)
    probability_matrix.masked_fill_(special_tokens_mask, value=0.0)
    masked_indices = torch.bernoulli(probability_matrix, generator=generator).bool()
    labels[~masked_indices] = -100
    indices_replaced = torch.bernoulli(torch.full(labels.shape, 0.8, device=device), generator=generator).bool()
    indices_replaced &= masked_indices
    inputs[indices_replaced] = mask_token_id
    indices_random = torch.bernoulli(torch.full(labels.shape, 0.5, device=device), generator=generator).bool()
    indices_random &= masked_indices & ~indices_replaced
    random_words = torch.randint(vocab_size, labels.shape, dtype=input_ids.dtype, device=device, generator=generator)
    inputs[indices_random] = random_words[indices_random]
    return inputs, labels


def make_batch(batch: int, seq_len: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT-like ids: [CLS] text [SEP] and padding after a random length; the special mask marks all three."""
    gen = torch.Generator(device="cpu").manual_seed(0)
    ids = torch.randint(1000, VOCAB, (batch, seq_len), generator=gen)
    lengths = torch.randint(seq_len // 2, seq_len + 1, (batch,), generator=gen)
    pos = torch.arange(seq_len)[None, :]
    ids[pos >= lengths[:, None]] = PAD_ID
    ids[:, 0] = CLS_ID
    ids[torch.arange(batch), lengths - 1] = SEP_ID
    special = (ids == CLS_ID) | (ids == SEP_ID) | (ids == PAD_ID)
    return ids.to(device), special.to(device)


def ideal_bytes(ids: torch.Tensor, special: torch.Tensor) -> int:
    """Read ids and the special mask, write masked ids and labels."""
    return ids.numel() * (3 * ids.element_size() + special.element_size())


def make_step(provider: str, ids: torch.Tensor, special: torch.Tensor):
    """A no-argument callable running ``provider`` once on the batch."""
    if provider == BASELINE:
        gen = torch.Generator(device=ids.device).manual_seed(0)
        return lambda: hf_torch_mask_tokens(
            ids, special, mask_token_id=MASK_ID, vocab_size=VOCAB, mlm_probability=MLM_PROBABILITY, generator=gen
        )
    if provider == "copy":
        buffer = torch.empty(ideal_bytes(ids, special) // 2, dtype=torch.uint8, device=ids.device)
        return buffer.clone
    seeds = iter(range(1 << 62))  # a new seed per call, as a training loop draws
    return lambda: mlm_mask(
        ids, mask_token_id=MASK_ID, vocab_size=VOCAB, special_tokens_mask=special,
        mlm_probability=MLM_PROBABILITY, seed=next(seeds), backend=provider,
    )


def _measure(provider: str, batch: int, seq_len: int, device: str, quick: bool) -> dict:
    row = {"name": "mlm_mask", "provider": provider, "batch": batch, "seq_len": seq_len, "dtype": "int64"}
    if provider == "triton" and torch.device(device).type != "cuda":
        row["skipped"] = "Triton runs on CUDA; on the CPU it only interprets, which times nothing useful"
        return row
    ids, special = make_batch(batch, seq_len, device)
    step = make_step(provider, ids, special)
    try:
        step()
    except BackendUnavailableError as exc:
        row["skipped"] = str(exc)[:300]
        return row
    ms = time_ms(step, device, rep=5 if quick else 20)
    row.update(median_ms=ms, gbps=ideal_bytes(ids, special) / ms / 1e6)
    peak = peak_memory_bytes(step, device)
    if peak is not None:
        row["peak_mem_mb"] = peak / 2**20
    return row


def run(device: str, quick: bool) -> list[dict]:
    sizes = GPU_SIZES if torch.device(device).type == "cuda" else CPU_SIZES
    if quick:
        sizes = sizes[:1] if torch.device(device).type != "cuda" else sizes
    rows = []
    for batch, seq_len in sizes:
        size_rows = [_measure(p, batch, seq_len, device, quick) for p in PROVIDERS]
        add_ratios(size_rows, BASELINE)
        copy = next((r for r in size_rows if r["provider"] == "copy" and "gbps" in r), None)
        for r in size_rows:
            if copy is not None and r is not copy and "gbps" in r:
                r["copy_fraction"] = r["gbps"] / copy["gbps"]
        rows.extend(size_rows)
    return rows


if __name__ == "__main__":
    cli("mlm_mask", run)
