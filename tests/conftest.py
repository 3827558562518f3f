"""Test set-up shared by every test file.

On a machine without CUDA the Triton kernels run in the interpreter. Triton reads
TRITON_INTERPRET when a kernel is decorated, so it is set here, before any test
module imports minipt.ops (and with it triton).
"""

import os
import sys

import torch

if not torch.cuda.is_available():
    assert "triton" not in sys.modules, "triton was imported before the conftest could set TRITON_INTERPRET"
    os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402

HAS_CUDA = torch.cuda.is_available()
DEVICES = ["cpu", "cuda"] if HAS_CUDA else ["cpu"]
# The device the Triton kernels run on: the GPU when there is one, else the interpreter.
TRITON_DEVICE = "cuda" if HAS_CUDA else "cpu"

requires_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
# The Triton backend of an exhaustive sweep. In the interpreter each case takes a second or more,
# so there the sweep is "slow" and the quick subset (-m "not slow") keeps the interpreter to the
# base cases: each option alone, at one or two shapes, in the tests that do not use this.
TRITON_SWEEP = pytest.param("triton", TRITON_DEVICE, id="triton", marks=() if HAS_CUDA else pytest.mark.slow)


def sampled_sweep(cases: list, ids=None) -> list:
    """Parametrize values whose first case is quick and whose others are marked slow: the quick
    subset samples an exhaustive sweep of the Triton interpreter, the whole suite runs all of it."""
    return [pytest.param(*(c if isinstance(c, tuple) else (c,)), marks=() if i == 0 or HAS_CUDA else pytest.mark.slow,
                         id=None if ids is None else ids(c)) for i, c in enumerate(cases)]


@pytest.fixture(scope="session", autouse=True)
def _fresh_inductor_cache(tmp_path_factory):
    """torch.compile's caches of this test session only. Inductor keys a cached graph on the graph, not
    on a custom op's fake implementation, so a cache left by an older build of the kernels would replay
    that build's output strides."""
    old = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(tmp_path_factory.mktemp("inductor"))
    yield
    if old is None:
        del os.environ["TORCHINDUCTOR_CACHE_DIR"]
    else:
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = old


@pytest.fixture(autouse=True)
def _seed_everything():
    torch.manual_seed(0)
    yield


@pytest.fixture
def poisoned_empty():
    """Make every torch.empty* return NaN (floats) or the dtype's max (integers).

    Kernels allocate their outputs with torch.empty, so an element a kernel forgets
    to write shows up as NaN or a huge id instead of passing by luck on zeroed memory.
    """
    old_det = torch.are_deterministic_algorithms_enabled()
    old_warn = torch.is_deterministic_algorithms_warn_only_enabled()
    old_fill = torch.utils.deterministic.fill_uninitialized_memory
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    yield
    torch.utils.deterministic.fill_uninitialized_memory = old_fill
    torch.use_deterministic_algorithms(old_det, warn_only=old_warn)


def assert_lowp_close(got, ref, lowp, name, *, elementwise=True):
    """flash-attention's rule for fp16/bf16 kernels: |got - ref| <= 2·|lowp - ref| + atol.

    ``ref`` is the reference computed in float32 or float64, ``lowp`` what PyTorch
    itself computes in the low-precision dtype; the tolerance is fixed by what
    PyTorch achieves instead of being guessed. atol is one unit in the last place
    of the low-precision dtype at the reference's largest value (at least 1e-6):
    a kernel that computes in float32 still rounds its output once, and where
    torch's own error cancels by chance the rule alone would demand better than
    rounding. ``elementwise=False`` compares the largest errors instead, for
    outputs whose every element sums many rounded products (attention gradients).
    """
    dtype = got.dtype
    got, ref, lowp = got.double(), ref.double(), lowp.double()
    atol = max(torch.finfo(dtype).eps * ref.abs().max().item(), 1e-6)
    err = (got - ref).abs()
    torch_err = (lowp - ref).abs()
    if not elementwise:
        err, torch_err = err.max(), torch_err.max()
    bound = 2 * torch_err + atol
    excess = err - bound
    worst = excess.argmax() if excess.dim() else 0
    assert bool((excess <= 0).all()), (
        f"{name}: |kernel - ref| = {err.flatten()[worst].item():.3g} exceeds 2·|torch in {dtype} - ref| + atol "
        f"= {bound.flatten()[worst].item():.3g}"
    )


def assert_rounding_would_fail(want, dtype, rtol):
    """A check that ``want`` is matched to ``rtol`` must fail a value rounded to ``dtype``, or it proves
    nothing about that rounding (a float32 loss of 16-bit inputs against one rounded to 16 bits)."""
    rounded = want.to(dtype).double()
    assert not torch.allclose(rounded, want.double(), rtol=rtol, atol=0), f"a {dtype} value would pass rtol={rtol} here"
