"""pytest-benchmark timings of MLM masking, and checks that the baseline is Hugging Face's recipe.

``pytest bench/test_mlm_mask.py --benchmark-only [--bench-device cpu|cuda]``.
"""

from __future__ import annotations

import math

import pytest
import torch

from bench import mlm_mask as bench
from minipt.ops import BackendUnavailableError


def _size(device: str) -> tuple[int, int]:
    return (256, 512) if torch.device(device).type == "cuda" else (32, 128)


@pytest.mark.parametrize("provider", bench.PROVIDERS)
def test_mlm_mask(measure, bench_device, provider):
    if provider == "triton" and torch.device(bench_device).type != "cuda":
        pytest.skip("Triton is timed on CUDA only: on the CPU it runs in the interpreter")
    ids, special = bench.make_batch(*_size(bench_device), bench_device)
    step = bench.make_step(provider, ids, special)
    try:
        step()
    except BackendUnavailableError as exc:
        pytest.skip(f"{provider} cannot run on {bench_device}: {exc}")
    out = measure(step)
    if provider != "copy":
        masked, labels = out
        assert masked.shape == ids.shape and not (labels[special] != -100).any()


def test_minipt_providers_draw_the_same_masks(bench_device):
    """The timed providers do the same work: from the same seed, the same masks, bit for bit."""
    ids, special = bench.make_batch(*_size(bench_device), bench_device)
    providers = ["torch", "native"] + (["triton"] if torch.device(bench_device).type == "cuda" else [])
    outputs = {}
    for provider in providers:
        try:
            outputs[provider] = bench.make_step(provider, ids, special)()  # the first call of each draws seed 0
        except BackendUnavailableError as exc:
            pytest.skip(f"{provider} cannot run on {bench_device}: {exc}")
    want = outputs.pop("torch")
    for provider, (masked, labels) in outputs.items():
        assert torch.equal(masked, want[0]) and torch.equal(labels, want[1]), provider


def test_hf_recipe_statistics():
    """The baseline selects 15% of the non-special positions and splits them 80/10/10."""
    ids, special = bench.make_batch(256, 512, "cpu")
    gen = torch.Generator().manual_seed(1)
    masked, labels = bench.hf_torch_mask_tokens(
        ids, special, mask_token_id=bench.MASK_ID, vocab_size=bench.VOCAB, mlm_probability=0.15, generator=gen
    )
    selected = labels != -100
    n, k = int((~special).sum()), int(selected.sum())
    assert not selected[special].any()
    assert abs(k / n - 0.15) < 4 * math.sqrt(0.15 * 0.85 / n)
    assert torch.equal(labels[selected], ids[selected]) and torch.equal(masked[~selected], ids[~selected])
    to_mask = (masked[selected] == bench.MASK_ID).float().mean().item()
    kept = (masked[selected] == ids[selected]).float().mean().item()
    assert abs(to_mask - 0.8) < 4 * math.sqrt(0.16 / k)
    assert abs(kept - 0.1) < 4 * math.sqrt(0.09 / k) + 1e-3
    assert bench.ideal_bytes(ids, special) == ids.numel() * 25  # 3 int64 passes + 1 bool pass
