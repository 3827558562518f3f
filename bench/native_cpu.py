"""The C++ CPU kernels of ``backend="native"`` against PyTorch's own CPU ops, side by side.

    python -m bench.native_cpu [--quick]

Rows, each with its baseline measured in the same run (ratio = baseline_ms / this_ms):

* cross_entropy, forward + backward of an (N, V) float32 batch: ``F.cross_entropy``
  (``backend="torch"``) against the fused C++ kernel. gbps counts the fused
  kernel's minimum traffic, 3·N·V·4 bytes (read, read, write), for every provider.
* mlm_mask on a (B, T) batch of int64 ids with a special-tokens mask: Hugging
  Face's ``DataCollatorForLanguageModeling.torch_mask_tokens`` (the baseline), our
  torch reference, and the C++ kernel. gbps counts 25 bytes per id (read id and
  flag, write id and label).
* linear_cross_entropy, forward + backward: ``F.linear`` + ``F.cross_entropy``
  against the chunked native op; tflops counts the three GEMMs, 6·N·D·V.

Providers take turns, round after round, and each reports the median over its
rounds, so load from elsewhere on the machine falls on all of them alike. These
are CPU figures: with ``--device cuda`` the module reports itself skipped (the
GPU comparisons of native against Triton and torch live in the op benchmarks).
Every row records ``simd``, the widest vector extension of the CPU: the C++
kernels are compiled for AVX-512, AVX2 and baseline x86-64 and pick one when the
extension loads, so machines sold under one name can give different figures.
"""

from __future__ import annotations

import statistics
from pathlib import Path

import torch
import torch.nn.functional as F

from bench.common import cli, time_ms
from minipt.ops import cross_entropy, linear_cross_entropy, mlm_mask

# The sizes of record; bench/test_native_cpu.py shrinks them to check the rows.
CE_SHAPE = (4096, 8192)  # (N, V)
MLM_SHAPE = (256, 512)  # (B, T)
MLM_VOCAB, MLM_MASK_ID = 30522, 103  # bert-base-uncased
LCE_SHAPE = (2048, 256, 8192)  # (N, D, V)


def cpu_simd() -> str:
    """``avx512``, ``avx2`` or ``baseline``: which of the C++ kernels' builds this CPU can run, widest first."""
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "unknown"
    flags = next((line.split(":", 1)[1].split() for line in cpuinfo.splitlines() if line.startswith("flags")), [])
    # Enough of the features of GCC's x86-64-v4 and x86-64-v3 levels to tell the three apart.
    if {"avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl"} <= set(flags):
        return "avx512"
    if {"avx2", "fma", "bmi1", "bmi2", "f16c", "movbe"} <= set(flags):
        return "avx2"
    return "baseline"


def interleaved_ms(fns: dict, rounds: int, rep: int) -> dict:
    """Median over ``rounds`` of each provider's ``time_ms``, the providers taking turns."""
    for fn in fns.values():
        fn()  # first-call costs (allocations, thread pools) stay out of the timings
    times = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            times[name].append(time_ms(fn, "cpu", warmup=1, rep=rep))
    return {name: statistics.median(t) for name, t in times.items()}


def rows_for(name: str, fns: dict, baseline: str, rounds: int, rep: int, fields: dict, work=None) -> list[dict]:
    """One row per provider; ``work`` = (metric, amount per call) turns a time into gbps or tflops."""
    ms = interleaved_ms(fns, rounds, rep)
    fields = {**fields, "simd": cpu_simd()}
    rows = []
    for provider, t in ms.items():
        row = {"name": name, "provider": provider, **fields, "median_ms": t, "ratio": ms[baseline] / t}
        if work is not None:
            metric, amount = work
            row[metric] = amount / (t * 1e-3) / (1e9 if metric == "gbps" else 1e12)
        rows.append(row)
    return rows


# ----------------------------------------------------------------------------- cross-entropy
def cross_entropy_rows(dtype: torch.dtype, rounds: int, rep: int) -> list[dict]:
    N, V = CE_SHAPE
    gen = torch.Generator().manual_seed(0)
    logits = (torch.randn(N, V, generator=gen) * 2).to(dtype).requires_grad_()
    target = torch.randint(0, V, (N,), generator=gen)

    def step(backend):
        def fn():
            cross_entropy(logits, target, backend=backend).backward()
            logits.grad = None

        return fn

    fns = {"torch": step("torch"), "native": step("native")}
    fields = {"N": N, "V": V, "dtype": str(dtype).removeprefix("torch.")}
    return rows_for("cross_entropy fwd+bwd", fns, "torch", rounds, rep, fields, ("gbps", 3 * N * V * 4))


# ----------------------------------------------------------------------------- MLM masking
def hf_collator_mask():
    """Hugging Face's masking as the collator runs it, on a word-level tokenizer of BERT's size;
    None when transformers is not installed."""
    try:
        from tokenizers import Tokenizer, models
        from transformers import DataCollatorForLanguageModeling, PreTrainedTokenizerFast
    except ImportError:
        return None
    vocab = {f"[unused{i}]": i for i in range(MLM_VOCAB) if i != MLM_MASK_ID}
    vocab["[MASK]"] = MLM_MASK_ID
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="[unused100]")), mask_token="[MASK]",
        pad_token="[unused0]",
    )
    collator = DataCollatorForLanguageModeling(tokenizer, mlm_probability=0.15)
    # The collator masks its batch in place, so it gets a copy, as it would of a fresh batch.
    return lambda ids, special: collator.torch_mask_tokens(ids.clone(), special_tokens_mask=special)


def mlm_mask_rows(rounds: int, rep: int) -> list[dict]:
    B, T = MLM_SHAPE
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(1000, MLM_VOCAB, (B, T), generator=gen)
    special = torch.zeros(B, T, dtype=torch.bool)
    special[:, 0] = special[:, -1] = True  # [CLS] ... [SEP]
    kwargs = dict(mask_token_id=MLM_MASK_ID, vocab_size=MLM_VOCAB, special_tokens_mask=special, seed=0)
    fns = {
        "torch": lambda: mlm_mask(ids, backend="torch", **kwargs),
        "native": lambda: mlm_mask(ids, backend="native", **kwargs),
    }
    fields = {"B": B, "T": T, "vocab": MLM_VOCAB}
    hf = hf_collator_mask()
    if hf is None:
        rows = rows_for("mlm_mask", fns, "torch", rounds, rep, fields, ("gbps", 25 * B * T))
        skipped = {"name": "mlm_mask", "provider": "hf-collator", **fields, "skipped": "transformers is not installed"}
        return rows + [skipped]
    fns = {"hf-collator": lambda: hf(ids, special), **fns}
    return rows_for("mlm_mask", fns, "hf-collator", rounds, rep, fields, ("gbps", 25 * B * T))


# ----------------------------------------------------------------------------- linear cross-entropy
def linear_cross_entropy_rows(rounds: int, rep: int) -> list[dict]:
    N, D, V = LCE_SHAPE
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(N, D, generator=gen).requires_grad_()
    weight = (torch.randn(V, D, generator=gen) / D**0.5).requires_grad_()
    target = torch.randint(0, V, (N,), generator=gen)

    def clear():
        hidden.grad = weight.grad = None

    def unfused():
        F.cross_entropy(F.linear(hidden, weight), target).backward()
        clear()

    def fused():
        linear_cross_entropy(hidden, weight, target, backend="native").backward()
        clear()

    fns = {"torch": unfused, "native": fused}
    fields = {"N": N, "D": D, "V": V, "dtype": "float32"}
    return rows_for("linear_cross_entropy fwd+bwd", fns, "torch", rounds, rep, fields, ("tflops", 6 * N * D * V))


def run(device: str, quick: bool) -> list[dict]:
    if torch.device(device).type != "cpu":
        return [{
            "name": "native_cpu", "provider": "native",
            "skipped": "times the C++ CPU kernels: run with --device cpu; native on CUDA is in the op benchmarks",
        }]
    rounds, rep = (3, 3) if quick else (7, 5)
    rows = cross_entropy_rows(torch.float32, rounds, rep)
    if not quick:
        rows += cross_entropy_rows(torch.bfloat16, rounds, rep)
    rows += mlm_mask_rows(rounds, 10 * rep)
    rows += linear_cross_entropy_rows(rounds, rep)
    return rows


if __name__ == "__main__":
    cli("native_cpu", run)
