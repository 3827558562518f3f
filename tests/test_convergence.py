"""Training on minipt's kernels follows the PyTorch reference, step for step.

A tiny GPT and a tiny BERT (MLM + NSP) train from the same seed on the same
batches on each backend, and their loss curves must agree with the torch
backend's (after Liger-Kernel's convergence tests), and fall. The batches are four
fixed ones, cycled, with masks fixed per batch, so that even a model this small
learns them within a few dozen steps.

Tolerance: everything runs in float32, and the backends differ only in the order
of their float32 sums, about 1e-7 relative per op. Adam normalises each update,
so those differences grow with the steps rather than fade. Measured on the CPU
over the 30 Triton steps, the curves agree within 5e-7 relative; a learning rate
1% off, a far smaller fault than a wrong kernel, moves them by 1e-3 within ten
steps and 5e-3 within thirty. The bound, 1e-4 relative, leaves the rounding
room to grow over 100 steps and still catches that. On CUDA the Triton dots may
run in TF32 (NOTES.md), so the bound there is 2e-2.

The Triton interpreter takes about a second a step even at this size, so on the
CPU the Triton runs stop at TRITON_CPU_STEPS; the other runs, and every run on
CUDA, take STEPS.
"""

import pytest
import torch

from conftest import HAS_CUDA
from minipt.models import build_model
from minipt.ops import BackendUnavailableError, mlm_mask

DEVICE = "cuda" if HAS_CUDA else "cpu"
STEPS, TRITON_CPU_STEPS = 100, 30
V, T, B = 32, 8, 2  # head dim 16 (n_embd 16, one head): the smallest the Triton attention takes
MASK_ID = 0
RTOL = 2e-2 if HAS_CUDA else 1e-4
SIZES = dict(vocab_size=V, block_size=T, n_layer=1, n_head=1, n_embd=16)


def batches() -> list[torch.Tensor]:
    """Four (B, T + 1) rows of arithmetic progressions mod V: each token follows from the last."""
    g = torch.Generator().manual_seed(1)
    start = torch.randint(1, V, (4, B, 1), generator=g)
    step = torch.randint(1, 4, (4, B, 1), generator=g)
    return list((start + step * torch.arange(T + 1)) % V)


def gpt_loss(model, seq: torch.Tensor, index: int, backend: str) -> torch.Tensor:
    return model(seq[:, :-1], labels=seq[:, 1:]).loss


def bert_loss(model, seq: torch.Tensor, index: int, backend: str) -> torch.Tensor:
    ids = seq[:, :-1]
    masked, labels = mlm_mask(ids, mask_token_id=MASK_ID, vocab_size=V, mlm_probability=0.3, seed=index,
                              backend=backend)
    # NSP label: whether the progression steps by more than 1, which the model can read off the whole row.
    nsp = (seq[:, 1] - seq[:, 0]) % V > 1
    return model(masked, labels=labels, next_sentence_label=nsp.long(), mlm_probability=0.3).loss


def train(kind: str, loss_fn, backend: str, steps: int) -> list[float]:
    torch.manual_seed(0)
    config = dict(SIZES, backend=backend, **({"dropout": 0.0} if kind == "bert" else {}))
    model = build_model(kind, config).to(DEVICE)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    data = [seq.to(DEVICE) for seq in batches()]
    losses = []
    for it in range(steps):
        loss = loss_fn(model, data[it % 4], it % 4, backend)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.detach())
    return torch.stack(losses).tolist()  # one host read for the whole curve


@pytest.fixture(scope="module")
def reference_curves() -> dict:
    return {kind: train(kind, loss_fn, "torch", STEPS) for kind, loss_fn in (("gpt", gpt_loss), ("bert", bert_loss))}


def falls(curve: list[float]) -> bool:
    first, last = sum(curve[:4]) / 4, sum(curve[-4:]) / 4  # whole cycles of the four batches
    return last < 0.7 * first


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["gpt", "bert"])
def test_the_reference_learns(kind, reference_curves):
    curve = reference_curves[kind]
    assert falls(curve), f"{kind}: the loss went from {curve[0]:.3f} to {curve[-1]:.3f} in {STEPS} steps"
    assert falls(curve[:TRITON_CPU_STEPS]), "the shorter Triton runs on the CPU would have nothing to show"


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["triton", "native"])
@pytest.mark.parametrize("kind, loss_fn", [("gpt", gpt_loss), ("bert", bert_loss)], ids=["gpt", "bert"])
def test_loss_curves_agree_with_the_reference_and_fall(kind, loss_fn, backend, reference_curves):
    steps = TRITON_CPU_STEPS if backend == "triton" and not HAS_CUDA else STEPS
    try:
        curve = train(kind, loss_fn, backend, steps)
    except BackendUnavailableError as exc:  # native on the CPU: no C++ attention kernel
        pytest.skip(f"backend={backend!r} cannot train the model on {DEVICE}: {exc}")
    reference = reference_curves[kind][:steps]
    torch.testing.assert_close(torch.tensor(curve), torch.tensor(reference), rtol=RTOL, atol=0)
    assert falls(curve), f"{kind} on {backend}: the loss went from {curve[0]:.3f} to {curve[-1]:.3f} in {steps} steps"
