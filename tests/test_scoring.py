"""The losses a run reports under bf16 autocast are float32, as F.cross_entropy gives them, not bf16-rounded."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from minipt.models import GPT, GPTConfig
from minipt.runtime import Runtime
from minipt.scoring import Scorer


@pytest.mark.parametrize("backend", ["torch", "native"])
def test_reported_losses_under_bf16_autocast_are_float32_cross_entropy(backend):
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=512, block_size=32, n_layer=1, n_head=2, n_embd=64, backend=backend))
    rng = np.random.default_rng(0)
    batches = [{"x": rng.integers(0, 500, (4, 32)), "y": rng.integers(0, 500, (4, 32))} for _ in range(3)]
    rt = Runtime(torch.device("cpu"), torch.bfloat16)
    scorer = Scorer("gpt", model, None, rt, backend=backend, val_batches=batches)

    expected = []
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        for batch in batches:
            x, y = torch.as_tensor(batch["x"]), torch.as_tensor(batch["y"])
            logits = model(x, return_logits=True).logits  # bf16, as autocast makes them
            expected.append(F.cross_entropy(logits.flatten(0, 1), y.flatten()).item())  # float32 under autocast
            train_loss = scorer.forward({"x": x, "y": y}, seed=0).loss  # what a training step logs
            assert train_loss.dtype == torch.float32
            assert train_loss.item() == pytest.approx(expected[-1], rel=1e-5)
            # a bf16-rounded loss would fail this comparison: it is coarser than 1e-5 here
            assert abs(train_loss.bfloat16().float().item() - expected[-1]) > 1e-5 * expected[-1]
    assert scorer.evaluate()["val_loss"] == pytest.approx(sum(expected) / len(expected), rel=1e-5)


@pytest.mark.parametrize("backend", ["torch", "native"])
def test_validation_scores_the_capped_cross_entropy_without_the_z_term(backend):
    """A training step's loss has the z term in it (and returns it apart); validation scores the cross-entropy
    of the capped logits alone, so that runs with and without a z-loss compare."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=64, block_size=16, n_layer=1, n_head=2, n_embd=32, backend=backend,
                          logit_softcap=2.0))
    rng = np.random.default_rng(0)
    batches = [{"x": rng.integers(0, 64, (3, 16)), "y": rng.integers(0, 64, (3, 16))} for _ in range(2)]
    scorer = Scorer("gpt", model, None, Runtime(torch.device("cpu"), torch.float32), backend=backend,
                    val_batches=batches)
    with torch.no_grad():
        cross_entropies = []
        for batch in batches:
            x, y = torch.as_tensor(batch["x"]), torch.as_tensor(batch["y"])
            logits = model(x, return_logits=True).logits  # capped
            assert logits.abs().max() < 2.0
            cross_entropies.append(F.cross_entropy(logits.flatten(0, 1), y.flatten()).item())
            step = scorer.forward({"x": x, "y": y}, seed=0, z_loss=0.1)
            assert step.z_loss.item() > 0.01 * step.loss.item()
            assert step.loss.item() == pytest.approx(cross_entropies[-1] + step.z_loss.item(), rel=1e-5)
    assert scorer.evaluate()["val_loss"] == pytest.approx(sum(cross_entropies) / len(cross_entropies), rel=1e-5)
