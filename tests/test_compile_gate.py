"""Compile-time resource gate: every Triton kernel a user can reach, compiled for the GPUs
minipt targets on a machine without one, must fit its GPU.

For each compiled kernel: no spilled registers (cuobjdump's stack frame is empty),
shared memory within the architecture's per-block limit, and for fp16/bf16
attention tensor-core instructions in the PTX (``wgmma`` on sm_90, ``mma.sync``
on sm_8x). tests/compile_kernels.py compiles the kernels through the public ops, so
launch configs and specialisations are the launchers' own, and a change to a
kernel's signature or launcher needs no change here.

Coverage. sm_80 and sm_90: the fp16/bf16 attention variants exhaustively (head dims
16-128, causal or not, masked or not, long sequences), fp32 and short sequences
sampled, packed documents (document_ids) at head dims 64 and 128 with causal
or padding, sliding windows (window_size, whose edge loop the forward and dQ
kernels add) at head dims 64 and 128 with causal or padding, with documents,
in fp32 and on short sequences, plus the cross-entropy (forward with and without the fused gradient,
backward; plain, soft-capped, with a z-loss and with both) and mlm_mask kernels. sm_86 and sm_89, whose ~99 KB of shared memory per
block is the tightest: their own launch table's 16-bit attention variants at head
dims 64 and 128 (sm_89: bf16 only; fp16 compiles to the same registers), and on sm_86
one packed variant for the dQ entry packed rows take below sm_90, and one windowed.
Several minutes of compiling on two cores, hence ``slow`` (which CI runs too).
"""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

HELPER = Path(__file__).with_name("compile_kernels.py")
# Shared memory a block may opt in to, per architecture (CUDA programming guide, compute capabilities).
SHARED_LIMIT = {80: 163 * 1024, 86: 99 * 1024, 89: 99 * 1024, 90: 227 * 1024}
ATTENTION_KERNELS = {"_attention_fwd_kernel", "_attention_bwd_delta_kernel", "_attention_bwd_dkdv_kernel",
                     "_attention_bwd_dq_kernel"}
TENSOR_CORE_KERNELS = {"_attention_fwd_kernel", "_attention_bwd_dkdv_kernel", "_attention_bwd_dq_kernel"}


def attention_variant(D, dtype, is_causal, masked, T=1024, docs=False, window=None):
    return {"op": "attention", "shape": [2, 3, T, D], "dtype": dtype, "causal": is_causal, "mask": masked,
            "docs": docs, "window": window}


def attention_16bit(dtypes=("float16", "bfloat16"), head_dims=(16, 32, 64, 128)):
    return [attention_variant(D, dtype, c, m) for dtype in dtypes for D in head_dims
            for c in (False, True) for m in (False, True)]


ATTENTION_SAMPLES = [
    # fp32: exact fp32 dots on smaller tiles, one table entry per head-dim class.
    attention_variant(128, "float32", True, True),
    attention_variant(64, "float32", False, False),
    attention_variant(32, "float32", True, False),
    attention_variant(16, "float32", False, True),
    # Short sequences take their own forward and dQ configs.
    attention_variant(128, "bfloat16", True, True, T=64),
    attention_variant(64, "float16", False, False, T=50),
    attention_variant(32, "bfloat16", False, True, T=64),
    attention_variant(16, "float16", True, False, T=33),
    # A length that no block size divides: T loses its divisibility specialisation.
    attention_variant(128, "bfloat16", True, True, T=1000),
    attention_variant(64, "float16", False, False, T=1000),
]
# Packed documents: each 16-bit launch-table entry, with causal or padding, and both together once.
ATTENTION_DOCUMENTS = [
    *(attention_variant(D, dtype, c, m, docs=True) for dtype in ("float16", "bfloat16") for D in (64, 128)
      for c, m in ((True, False), (False, True))),
    attention_variant(128, "bfloat16", True, True, docs=True),
    attention_variant(64, "float16", False, False, docs=True),
]
# Sliding windows, whose launches take their own entries where the table's spilled: each 16-bit
# launch-table entry, causal or bidirectional with padding; with documents; fp32; a short sequence's
# configs. Every combination of masks was compiled once for sm_80 and sm_90 when those entries were chosen.
ATTENTION_WINDOWS = [
    *(attention_variant(D, dtype, c, m, window=w) for dtype in ("float16", "bfloat16") for D in (64, 128)
      for c, m, w in ((True, False, [255, 0]), (False, True, [128, 128]))),
    attention_variant(128, "bfloat16", True, True, docs=True, window=[255, 0]),
    attention_variant(64, "float16", False, False, docs=True, window=[31, 200]),
    attention_variant(128, "float32", True, False, window=[100, 0]),
    attention_variant(64, "float32", False, True, window=[64, 64]),
    attention_variant(64, "float32", False, False, docs=True, window=[128, 128]),
    attention_variant(128, "bfloat16", True, False, T=64, window=[20, 0]),
    attention_variant(32, "float16", False, True, T=1000, window=[7, 3]),
]
LOSS_AND_MASKING = [
    {"op": "cross_entropy", "shape": [8, 50257], "dtype": "bfloat16"},
    {"op": "cross_entropy", "shape": [8, 50257], "dtype": "float32"},
    {"op": "cross_entropy", "shape": [8, 1000], "dtype": "float16"},
    {"op": "cross_entropy", "shape": [8, 100], "dtype": "float64"},
    {"op": "linear_cross_entropy", "shape": [8, 50257], "dtype": "bfloat16"},
    {"op": "linear_cross_entropy", "shape": [8, 8192], "dtype": "float32"},
    {"op": "linear_cross_entropy", "shape": [8, 50], "dtype": "float16"},
    # Soft-capping and the z-loss are constexpr flags: each combination is a kernel of its own, and each
    # of the forward's eight (with WRITE_GRAD) and the backward's four is compiled here.
    {"op": "cross_entropy", "shape": [8, 50257], "dtype": "bfloat16", "softcap": 30.0, "z_loss": 1e-4},
    {"op": "cross_entropy", "shape": [8, 50257], "dtype": "float32", "softcap": 30.0},
    {"op": "cross_entropy", "shape": [8, 1000], "dtype": "float16", "z_loss": 1e-4},
    {"op": "cross_entropy", "shape": [8, 100], "dtype": "float64", "softcap": 30.0, "z_loss": 1e-4},
    {"op": "linear_cross_entropy", "shape": [8, 50257], "dtype": "bfloat16", "softcap": 30.0, "z_loss": 1e-4},
    {"op": "linear_cross_entropy", "shape": [8, 8192], "dtype": "float32", "z_loss": 1e-4},
    {"op": "linear_cross_entropy", "shape": [8, 50], "dtype": "float16", "softcap": 30.0},
    {"op": "mlm_mask", "shape": [4, 128], "dtype": "int64", "special": True},
    {"op": "mlm_mask", "shape": [3, 100], "dtype": "int32", "special": False},
]
VARIANTS = {
    80: attention_16bit() + ATTENTION_SAMPLES + ATTENTION_DOCUMENTS + ATTENTION_WINDOWS + LOSS_AND_MASKING,
    90: attention_16bit() + ATTENTION_SAMPLES + ATTENTION_DOCUMENTS + ATTENTION_WINDOWS + LOSS_AND_MASKING,
    86: attention_16bit(head_dims=(64, 128)) + [attention_variant(128, "bfloat16", True, True, docs=True),
                                                 attention_variant(128, "bfloat16", True, True, window=[255, 0])],
    89: attention_16bit(dtypes=("bfloat16",), head_dims=(64, 128)),
}


def compile_for(arch: int) -> list[dict]:
    # The test process interprets kernels (see conftest.py); the helper must not.
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run(
        [sys.executable, str(HELPER), str(arch)], input=json.dumps(VARIANTS[arch]),
        capture_output=True, text=True, env=env, timeout=1800, check=False,
    )
    assert result.returncode == 0, f"compiling for sm_{arch} failed:\n{result.stderr[-4000:]}"
    return [json.loads(line) for line in result.stdout.splitlines()]


@pytest.fixture(scope="module")
def compiled() -> dict[int, list[dict]]:
    """Rows of tests/compile_kernels.py per architecture; the architectures compile in parallel."""
    with ThreadPoolExecutor(max_workers=max(1, min(len(VARIANTS), os.cpu_count() or 1))) as pool:
        return dict(zip(VARIANTS, pool.map(compile_for, VARIANTS)))


def describe(row: dict) -> str:
    v = row["variant"]
    flags = "".join(f" {k}={v[k]}" for k in ("causal", "mask", "docs", "window", "special", "softcap", "z_loss")
                    if k in v)
    return f"{row['kernel']} {v['op']} {v['dtype']} {tuple(v['shape'])}{flags} {row['constexprs']}"


@pytest.mark.parametrize("arch", sorted(VARIANTS))
def test_every_variant_compiled_its_kernels(arch, compiled):
    """A variant that compiled nothing (a launcher that changed its path) would pass the checks below vacuously."""
    rows = compiled[arch]
    for variant in VARIANTS[arch]:
        kernels = {r["kernel"] for r in rows if r["variant"] == variant}
        if variant["op"] == "attention":
            expected = ATTENTION_KERNELS | ({"_key_range_kernel"} if variant["mask"] else set())
            assert kernels == expected, f"sm_{arch} {variant}: compiled {sorted(kernels)}"
        else:
            assert kernels, f"sm_{arch} {variant}: compiled no kernel"
    ce = [r for r in rows if r["kernel"] == "_cross_entropy_fwd_kernel"]
    if ce:
        flags = {tuple(r["constexprs"].get(f) for f in ("WRITE_GRAD", "SOFTCAP", "Z_LOSS")) for r in ce}
        assert flags == set(itertools.product(("False", "True"), repeat=3)), f"cross-entropy forwards: {sorted(flags)}"
        bwd = {tuple(r["constexprs"].get(f) for f in ("SOFTCAP", "Z_LOSS"))
               for r in rows if r["kernel"] == "_cross_entropy_bwd_kernel"}
        assert bwd == set(itertools.product(("False", "True"), repeat=2)), f"cross-entropy backwards: {sorted(bwd)}"
        assert any(r["kernel"] == "_mlm_mask_kernel" for r in rows)


@pytest.mark.parametrize("arch", sorted(VARIANTS))
def test_no_register_spills(arch, compiled):
    spilled = [f"{describe(r)}: {r['registers']} registers, {r['stack']} B stack, {r['local']} B local"
               for r in compiled[arch] if r["stack"] or r["local"]]
    assert not spilled, f"sm_{arch}: {len(spilled)} kernels spill registers:\n" + "\n".join(spilled)


@pytest.mark.parametrize("arch", sorted(VARIANTS))
def test_shared_memory_fits(arch, compiled):
    over = [f"{describe(r)}: {r['shared']} B" for r in compiled[arch] if r["shared"] > SHARED_LIMIT[arch]]
    assert not over, f"sm_{arch}: over the {SHARED_LIMIT[arch]} B per block:\n" + "\n".join(over)


@pytest.mark.parametrize("arch", sorted(VARIANTS))
def test_16bit_attention_uses_tensor_cores(arch, compiled):
    instruction = "wgmma" if arch >= 90 else "mma"
    scalar = [describe(r) for r in compiled[arch]
              if r["kernel"] in TENSOR_CORE_KERNELS and r["variant"]["dtype"] in ("float16", "bfloat16")
              and not r[instruction]]
    assert not scalar, f"sm_{arch}: no {instruction} instruction in:\n" + "\n".join(scalar)
