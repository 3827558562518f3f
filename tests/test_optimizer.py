"""The optimizer of a run: which parameters AdamW and Muon take, their learning rates on one schedule,
their state, the settings' checks, and the default (AdamW) left exactly as it was."""

import re

import pytest
import torch

from minipt.checkpoint import CheckpointError
from minipt.config import ConfigError, FinetuneConfig, TrainConfig
from minipt.loop import Schedule, make_optimizer, muon_parameters
from minipt.models import BERT, GPT, BertClassifier, BertClassifierConfig, BertConfig, GPTConfig

CPU = torch.device("cpu")
SIZES = dict(vocab_size=64, block_size=8, n_layer=2, n_head=2, n_embd=16)
# The weight matrices of the blocks, by name: attention (fused q, k, v and the output projection) and MLP.
BLOCK_MATRIX = re.compile(r"(transformer\.h|layers)\.\d+\.(attn\.c_attn|attn\.c_proj|mlp\.c_fc|mlp\.c_proj"
                          r"|attn\.qkv|attn\.proj|fc|proj)\.weight$")

MODELS = {
    "gpt": lambda: GPT(GPTConfig(**SIZES)),
    "bert": lambda: BERT(BertConfig(**SIZES)),
    "classifier": lambda: BertClassifier(BertClassifierConfig(**SIZES, num_labels=3)),
}


def muon(model, **kwargs):
    return make_optimizer(model, learning_rate=1e-3, betas=(0.9, 0.99), weight_decay=0.1, device=CPU,
                          optimizer="muon", muon_learning_rate=0.02, **kwargs)


@pytest.mark.parametrize("kind", MODELS)
def test_muon_takes_the_block_matrices_and_adamw_everything_else_each_once(kind):
    model = MODELS[kind]()
    names = {id(p): name for name, p in model.named_parameters()}
    opt = muon(model)
    taken = {part: [names[id(p)] for g in o.param_groups for p in g["params"]] for part, (o, _) in opt.parts.items()}
    everything = taken["adamw"] + taken["muon"]
    assert sorted(everything) == sorted(names.values())  # every parameter (the tied head once), none twice
    assert taken["muon"] and all(BLOCK_MATRIX.search(name) for name in taken["muon"])
    assert not [name for name in taken["adamw"] if BLOCK_MATRIX.search(name)]
    assert len(taken["muon"]) == 4 * SIZES["n_layer"]
    # embeddings, the tied LM head, norms, biases and every head stay with AdamW
    expected = {
        "gpt": ["transformer.wte.weight", "transformer.wpe.weight", "transformer.ln_f.weight",
                "transformer.h.0.ln_1.weight", "transformer.h.1.attn.c_attn.bias"],
        "bert": ["embeddings.word_embeddings.weight", "embeddings.position_embeddings.weight",
                 "embeddings.token_type_embeddings.weight", "pooler.weight", "nsp_head.weight",
                 "mlm_head.dense.weight", "mlm_head.decoder_bias", "layers.0.ln_2.bias"],
        "classifier": ["classifier.weight", "classifier.bias", "bert.embeddings.word_embeddings.weight",
                       "bert.pooler.weight"],
    }[kind]
    assert set(expected) <= set(taken["adamw"])
    decayed, plain = opt.parts["adamw"][0].param_groups
    assert decayed["weight_decay"] == 0.1 and plain["weight_decay"] == 0.0
    assert all(p.dim() == 2 for p in decayed["params"]) and all(p.dim() == 1 for p in plain["params"])
    (group,) = opt.parts["muon"][0].param_groups
    assert group["weight_decay"] == 0.1 and group["momentum"] == 0.95 and group["nesterov"]


def test_frozen_parameters_go_to_neither():
    model = MODELS["gpt"]()
    frozen = [model.transformer.h[0].attn.c_attn.weight, model.transformer.wpe.weight]
    for p in frozen:
        p.requires_grad_(False)
    opt = muon(model)
    held = [p for g in opt.param_groups for p in g["params"]]
    assert not any(p is q for p in held for q in frozen)
    assert len(held) == len([p for p in model.parameters() if p.requires_grad])
    assert len(muon_parameters(model)) == 4 * SIZES["n_layer"] - 1


def test_both_learning_rates_follow_one_schedule_to_their_own_peaks():
    schedule = Schedule(learning_rate=1e-3, warmup_iters=3, decay_iters=20, min_lr=1e-4)
    opt = muon(MODELS["gpt"]())
    for it in (0, 2, 3, 10, 20, 30):
        opt.set_lr(schedule.lr(it))
        adamw, muon_group = opt.parts["adamw"][0].param_groups, opt.parts["muon"][0].param_groups[0]
        assert all(g["lr"] == schedule.lr(it) for g in adamw)  # the schedule's own value, bit for bit
        assert muon_group["lr"] == pytest.approx(schedule.lr(it) * 20)
    opt.set_lr(schedule.lr(10))
    assert opt.parts["muon"][0].param_groups[0]["lr"] == pytest.approx(0.02 * schedule.lr(10) / 1e-3)


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


def test_the_state_round_trips_and_refuses_another_optimizers():
    torch.manual_seed(0)
    model = MODELS["gpt"]()
    opt = muon(model)
    train_steps(model, lambda it: (opt.step(), opt.zero_grad()))
    state = opt.state_dict()
    assert set(state) == {"adamw", "muon"}
    assert all("momentum_buffer" in s for s in state["muon"]["state"].values())
    again = muon(model)
    again.load_state_dict(state)
    for name in ("adamw", "muon"):
        for a, b in zip(again.parts[name][0].state.values(), opt.parts[name][0].state.values()):
            assert all(torch.equal(a[k], b[k]) for k in a)
    adamw = make_optimizer(model, learning_rate=1e-3, betas=(0.9, 0.99), weight_decay=0.1, device=CPU)
    with pytest.raises(CheckpointError, match=r"state is of adamw \+ muon, but this run trains with adamw"):
        adamw.load_state_dict(state)


@pytest.mark.parametrize("cls", [TrainConfig, FinetuneConfig])
@pytest.mark.parametrize("setting, message", [
    (dict(optimizer="sgd"), "optimizer must be one of adamw, muon; got 'sgd'"),
    (dict(muon_learning_rate=0.0), "muon_learning_rate must be > 0, got 0.0"),
    (dict(muon_learning_rate=-0.02), "muon_learning_rate must be > 0, got -0.02"),
    (dict(muon_momentum=1.0), r"muon_momentum must be in \[0.0, 1.0\), got 1.0"),
    (dict(muon_momentum=-0.1), r"muon_momentum must be in \[0.0, 1.0\), got -0.1"),
    (dict(learning_rate=0.0), "learning_rate must be > 0, got 0.0"),
    (dict(beta2=1.0), r"beta2 must be in \[0.0, 1.0\), got 1.0"),
    (dict(weight_decay=-1.0), "weight_decay must be >= 0, got -1.0"),
])
def test_bad_optimizer_settings_are_named(cls, setting, message):
    with pytest.raises(ConfigError, match=message):
        cls(**setting)
    assert cls(optimizer="muon", muon_momentum=0.0).muon_momentum == 0.0
