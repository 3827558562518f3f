"""The optimizer of a run: the default (AdamW) exactly as it was, and its state."""

import torch

from minipt.loop import Schedule, make_optimizer
from minipt.models import GPT, GPTConfig

CPU = torch.device("cpu")
SIZES = dict(vocab_size=64, block_size=8, n_layer=2, n_head=2, n_embd=16)
MODELS = {"gpt": lambda: GPT(GPTConfig(**SIZES))}


def batch(seed: int) -> torch.Tensor:
    return torch.randint(0, SIZES["vocab_size"], (4, SIZES["block_size"]), generator=torch.Generator().manual_seed(seed))


def train_steps(model, step_lr, steps: int = 5) -> None:
    for it in range(steps):
        x = batch(it)
        model(x, labels=x).loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        step_lr(it)


def test_the_default_is_nanogpts_fused_adamw_bit_for_bit():
    schedule = Schedule(learning_rate=3e-3, warmup_iters=2, decay_iters=5, min_lr=3e-4)
    torch.manual_seed(0)
    ours = MODELS["gpt"]()
    theirs = MODELS["gpt"]()
    theirs.load_state_dict(ours.state_dict())
    opt = make_optimizer(ours, learning_rate=3e-3, betas=(0.9, 0.99), weight_decay=0.1, device=CPU)
    assert list(opt.parts) == ["adamw"]
    params = list(theirs.parameters())
    reference = torch.optim.AdamW([
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": 0.1},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ], lr=3e-3, betas=(0.9, 0.99), fused=True)

    def step_ours(it):
        opt.set_lr(schedule.lr(it))
        opt.step()
        opt.zero_grad()

    def step_reference(it):
        for group in reference.param_groups:
            group["lr"] = schedule.lr(it)
        reference.step()
        reference.zero_grad(set_to_none=True)

    train_steps(ours, step_ours)
    train_steps(theirs, step_reference)
    for p, q in zip(ours.parameters(), theirs.parameters()):
        assert torch.equal(p, q)
    saved, expected = opt.state_dict(), reference.state_dict()
    assert list(saved) == ["adamw"] and saved["adamw"]["param_groups"] == expected["param_groups"]
    for a, b in zip(saved["adamw"]["state"].values(), expected["state"].values()):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # a run saved before the choice of optimizer holds AdamW's own state: it still resumes
    fresh = make_optimizer(MODELS["gpt"](), learning_rate=3e-3, betas=(0.9, 0.99), weight_decay=0.1, device=CPU)
    fresh.load_state_dict(reference.state_dict())
    assert fresh.parts["adamw"][0].state_dict()["state"].keys() == reference.state_dict()["state"].keys()
