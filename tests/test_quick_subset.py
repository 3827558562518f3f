"""The quick subset, ``python -m pytest -m "not slow"``, as the README offers it: it leaves out the
exhaustive sweeps of the Triton interpreter, not the checks of a kernel. Every option of every kernel
stays checked on every backend the machine can run, at one or two shapes."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import HAS_CUDA

TESTS = Path(__file__).parent
# (file, test-name prefix): an option of a kernel, and the tests that check it against float64.
OPTIONS = [
    ("test_attention.py", "test_matches_reference"),
    ("test_attention.py", "test_key_padding"),
    ("test_attention.py", "test_documents"),
    ("test_attention_window.py", "test_window_matches_reference"),
    ("test_attention_window.py", "test_window_with_padding_and_documents"),
    ("test_cross_entropy.py", "test_matches_float64_reference"),
    ("test_cross_entropy.py", "test_softcap_and_z_loss_match_float64_reference"),
    ("test_linear_cross_entropy.py", "test_matches_float64_reference"),
    ("test_linear_cross_entropy.py", "test_softcap_and_z_loss_match_float64_reference"),
    ("test_mlm_mask.py", "test_any_shape_and_every_element_written"),
]
BACKENDS = ("triton", "native")


def collected(*args: str) -> list[str]:
    files = sorted({str(TESTS / f) for f, _ in OPTIONS} | {str(TESTS / "test_attention_tiles.py")})
    out = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", *args,
                          *files], capture_output=True, text=True, cwd=TESTS.parent)
    assert out.returncode == 0, out.stdout + out.stderr
    return [line for line in out.stdout.splitlines() if "::" in line]


@pytest.fixture(scope="module")
def quick() -> list[str]:
    return collected("-m", "not slow")


@pytest.mark.parametrize("file, prefix", OPTIONS, ids=lambda x: x)
def test_every_option_stays_checked_on_every_kernel_backend(quick, file, prefix):
    ids = [i for i in quick if i.startswith(f"tests/{file}::{prefix}")]
    for backend in BACKENDS:
        assert any(backend in i for i in ids), f"no quick {prefix} case of the {backend} backend"


def test_the_tile_counts_keep_one_case_of_each_pass(quick):
    names = {re.sub(r"\[.*", "", i) for i in quick if "test_attention_tiles.py" in i}
    assert {f"tests/test_attention_tiles.py::test_tile_counts_are_the_tiles_the_{p}_reads"
            for p in ("forward", "dkdv_pass", "windowed_forward", "windowed_dkdv_pass")} <= names


@pytest.mark.skipif(HAS_CUDA, reason="with CUDA the Triton sweeps run on the device and none is slow")
def test_the_interpreted_sweeps_are_what_it_leaves_out(quick):
    """The whole suite still runs every case; the quick subset drops the interpreted Triton ones of the sweeps."""
    every = collected()
    left_out = {i for i in set(every) - set(quick) if any(f"{f}::{prefix}" in i for f, prefix in OPTIONS)}
    assert left_out, "the quick subset leaves no case of the sweeps out"
    assert all("triton" in i for i in left_out), sorted(i for i in left_out if "triton" not in i)[:5]
