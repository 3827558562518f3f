"""GPT and BERT: shapes, losses against F.cross_entropy on the full logits, gradients,
masking, sampling, configs, and the same tiny models on every backend."""

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

from conftest import HAS_CUDA, TRITON_DEVICE
from minipt.models import (
    BERT, BERT_PRESETS, GPT, GPT_PRESETS, MODEL_KINDS, BertClassifierConfig, BertConfig, GPTConfig, ModelOutput,
    build_model,
)
from minipt.models import bert as bert_module, gpt as gpt_module
from minipt.ops import IGNORE_INDEX, attention
from minipt.ops.mlm_mask import masked_capacity

# Odd sizes, so that a transposed or mis-split dimension shows up as a shape error or a wrong value;
# head dim 16, the smallest the Triton attention kernel takes.
GPT_TINY = dict(vocab_size=61, block_size=16, n_layer=2, n_head=3, n_embd=48, backend="torch")
BERT_TINY = dict(
    vocab_size=53, block_size=16, n_layer=2, n_head=3, n_embd=48, n_inner=40, dropout=0.0, backend="torch"
)


def tiny_gpt(**overrides) -> GPT:
    return GPT(GPTConfig(**{**GPT_TINY, **overrides}))


def tiny_bert(**overrides) -> BERT:
    return BERT(BertConfig(**{**BERT_TINY, **overrides}))


def bert_batch(B=3, T=11, vocab=53, device="cpu"):
    """Right-padded rows of different lengths, both token types, ~30% of real tokens masked."""
    lengths = torch.tensor([T, T - 4, 3] * 3)[:B]
    mask = torch.arange(T)[None, :] < lengths[:, None]  # (B, T)
    input_ids = torch.randint(1, vocab, (B, T)).masked_fill(~mask, 0)
    token_type_ids = (torch.arange(T)[None, :] >= (lengths[:, None] // 2)).long() * mask
    labels = torch.where(mask & (torch.rand(B, T) < 0.3), torch.randint(0, vocab, (B, T)), IGNORE_INDEX)
    labels[0, 1] = 7  # at least one masked position
    nsp = torch.tensor([0, 1, 1] * 3)[:B]
    batch = dict(
        input_ids=input_ids, token_type_ids=token_type_ids, attention_mask=mask.long(), labels=labels,
        next_sentence_label=nsp,
    )
    return {k: v.to(device) for k, v in batch.items()}


def grads(model) -> dict:
    return {name: p.grad.clone() for name, p in model.named_parameters()}


# ----------------------------------------------------------------------------- configs and presets
@pytest.mark.parametrize("name", sorted(GPT_PRESETS))
def test_gpt_presets_build_valid_configs(name):
    cfg = GPTConfig.preset(name, dropout=0.1)
    assert cfg.dropout == 0.1 and cfg.n_embd % cfg.n_head == 0
    for field, value in GPT_PRESETS[name].items():
        assert getattr(cfg, field) == value


@pytest.mark.parametrize("name", sorted(BERT_PRESETS))
def test_bert_presets_build_valid_configs(name):
    cfg = BertConfig.preset(name, vocab_size=1000)
    assert cfg.vocab_size == 1000 and cfg.inner_size == 4 * cfg.n_embd
    for field, value in BERT_PRESETS[name].items():
        assert getattr(cfg, field) == value


def test_published_parameter_counts():
    # Built on the meta device: the counts need shapes, not memory.
    with torch.device("meta"):
        gpt2 = GPT(GPTConfig.preset("gpt2", vocab_size=50257))
        bert_base = BERT(BertConfig.preset("bert-base"))
        bert_large = BERT(BertConfig.preset("bert-large"))
    assert gpt2.num_params(non_embedding=False) == 124_439_808  # GPT2LMHeadModel "gpt2", tied head
    assert gpt2.num_params() == 124_439_808 - 1024 * 768
    assert bert_base.num_params(non_embedding=False) == 110_106_428  # BertForPreTraining "bert-base-uncased"
    assert bert_base.num_params() == 110_106_428 - 512 * 768 - 2 * 768
    assert 335e6 < bert_large.num_params(non_embedding=False) < 337e6


def test_unknown_preset_and_field_are_named():
    with pytest.raises(ValueError, match="gpt-tiny"):
        GPTConfig.preset("gpt3")
    with pytest.raises(ValueError, match="bert-base"):
        BertConfig.preset("roberta")
    with pytest.raises(ValueError, match="n_heads"):
        GPTConfig.preset("gpt-tiny", n_heads=4)


@pytest.mark.parametrize(
    "cls, overrides, exc, pattern",
    [
        (GPTConfig, dict(n_embd=30, n_head=4), ValueError, r"n_embd \(30\).*n_head \(4\)"),
        (BertConfig, dict(n_embd=30, n_head=4), ValueError, r"n_embd \(30\).*n_head \(4\)"),
        (GPTConfig, dict(n_layer=0), ValueError, "n_layer must be a positive int"),
        (GPTConfig, dict(vocab_size=-3), ValueError, "vocab_size must be a positive int"),
        (GPTConfig, dict(block_size=8.0), TypeError, "block_size must be an int"),
        (GPTConfig, dict(n_head=True), TypeError, "n_head must be an int"),
        (GPTConfig, dict(dropout=1.0), ValueError, r"dropout must be a float in \[0, 1\)"),
        (BertConfig, dict(dropout=-0.1), ValueError, r"dropout must be a float in \[0, 1\)"),
        (GPTConfig, dict(layer_norm_eps=0.0), ValueError, "layer_norm_eps"),
        (GPTConfig, dict(bias=1), TypeError, "bias must be a bool"),
        (BertConfig, dict(n_inner=0), ValueError, "n_inner must be a positive int"),
        (BertConfig, dict(type_vocab_size=0), ValueError, "type_vocab_size must be a positive int"),
        (BertConfig, dict(pad_token_id=30522), ValueError, r"pad_token_id must be in \[0, vocab_size=30522\)"),
        (GPTConfig, dict(attn_window=0), ValueError, "attn_window must be a positive int, got 0"),
        (BertConfig, dict(attn_window=64.0), TypeError, "attn_window must be an int"),
        (GPTConfig, dict(attn_window=8, global_every=-1), ValueError, "global_every must be a positive int"),
        (BertConfig, dict(global_every=3), ValueError, "global_every needs attn_window"),
        *((cls, dict(logit_softcap=bad), ValueError, "logit_softcap must be a positive finite float")
          for cls, bad in ((GPTConfig, 0.0), (BertConfig, -30.0), (GPTConfig, math.inf), (BertConfig, "30"))),
    ],
)
def test_config_errors_name_the_field(cls, overrides, exc, pattern):
    with pytest.raises(exc, match=pattern):
        cls(**overrides)


def test_a_bad_backend_is_named_by_the_first_op_it_reaches():
    with pytest.raises(ValueError, match=r"backend must be one of \('auto', 'torch', 'triton', 'native'\), got 'cuda'"):
        tiny_gpt(backend="cuda")(torch.zeros(1, 4, dtype=torch.long))


def test_build_model_from_a_saved_config_or_a_config_object():
    saved = dataclasses.asdict(GPTConfig(**GPT_TINY))
    assert isinstance(build_model("gpt", saved), GPT) and build_model("gpt", saved).config == GPTConfig(**GPT_TINY)
    assert isinstance(build_model("bert", BertConfig(**BERT_TINY)), BERT)
    assert set(MODEL_KINDS) == {"gpt", "bert", "bert_classifier"}
    with pytest.raises(ValueError, match=r"kind must be one of \['bert', 'bert_classifier', 'gpt'\], got 't5'"):
        build_model("t5", saved)
    with pytest.raises(ValueError, match="n_layer must be a positive int"):
        build_model("bert", {**dataclasses.asdict(BertConfig(**BERT_TINY)), "n_layer": 0})


def test_models_take_only_their_config():
    with pytest.raises(TypeError, match="GPTConfig"):
        GPT(BertConfig(**BERT_TINY))
    with pytest.raises(TypeError, match="BertConfig"):
        BERT(dict(BERT_TINY))


# ----------------------------------------------------------------------------- GPT
def test_gpt_shapes_and_tied_head():
    model = tiny_gpt()
    x = torch.randint(0, 61, (2, 13))
    out = model(x)
    assert isinstance(out, ModelOutput) and out.loss is None
    assert out.logits.shape == (2, 13, 61)
    wte = model.transformer.wte.weight
    torch.testing.assert_close(out.logits, model.hidden_states(x) @ wte.T, rtol=1e-6, atol=1e-6)
    # The head is the embedding itself: no other (V, C) parameter exists.
    assert [n for n, p in model.named_parameters() if p.shape == wte.shape] == ["transformer.wte.weight"]


def test_gpt_init_follows_gpt2():
    model = GPT(GPTConfig(vocab_size=300, block_size=64, n_layer=4, n_head=4, n_embd=128, backend="torch"))
    residual_std = 0.02 / math.sqrt(2 * 4)
    for name, p in model.named_parameters():
        if name.endswith("c_proj.weight"):
            assert abs(p.std().item() / residual_std - 1) < 0.05, name
        elif name.endswith("ln_1.weight") or name.endswith("ln_2.weight") or name.endswith("ln_f.weight"):
            assert torch.all(p == 1), name
        elif name.endswith(".bias"):
            assert torch.all(p == 0), name
        else:
            assert abs(p.std().item() / 0.02 - 1) < 0.05, name


def test_gpt_loss_equals_cross_entropy_of_full_logits():
    model = tiny_gpt()
    x = torch.randint(0, 61, (3, 16))
    labels = torch.randint(0, 61, (3, 16))
    labels[1, 4:9] = IGNORE_INDEX
    out = model(x, labels)
    assert out.logits is None  # return_logits=None: no logits when labels are given
    out.loss.backward()
    fused = grads(model)
    model.zero_grad()

    out_full = model(x, labels, return_logits=True)
    ref = F.cross_entropy(out_full.logits.reshape(-1, 61), labels.reshape(-1), ignore_index=IGNORE_INDEX)
    torch.testing.assert_close(out.loss, ref, rtol=1e-6, atol=1e-6)
    ref.backward()
    for name, g in grads(model).items():
        torch.testing.assert_close(fused[name], g, rtol=1e-5, atol=1e-7, msg=name)


def test_gpt_is_causal():
    model = tiny_gpt().eval()
    x = torch.randint(0, 61, (2, 12))
    y = x.clone()
    y[:, 7:] = torch.randint(0, 61, (2, 5))
    a, b = model(x).logits, model(y).logits
    torch.testing.assert_close(a[:, :7], b[:, :7], rtol=0, atol=0)
    assert not torch.allclose(a[:, 7:], b[:, 7:])


def test_dropout_acts_in_training_only():
    model = tiny_gpt(dropout=0.5)
    x = torch.randint(0, 61, (2, 9))
    assert not torch.equal(model(x).logits, model(x).logits)
    model.eval()
    assert torch.equal(model(x).logits, model(x).logits)


def test_gpt_bad_inputs_are_named():
    model = tiny_gpt()
    with pytest.raises(ValueError, match="block_size is 16"):
        model(torch.zeros(1, 17, dtype=torch.long))
    with pytest.raises(TypeError, match="input_ids must hold integer ids"):
        model(torch.zeros(1, 4))
    with pytest.raises(ValueError, match=r"input_ids must have shape \(B, T\)"):
        model(torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="labels must have the shape of input_ids"):
        model(torch.zeros(2, 4, dtype=torch.long), torch.zeros(2, 3, dtype=torch.long))


# ----------------------------------------------------------------------------- generate
def test_generate_shape_prefix_and_determinism():
    model = tiny_gpt().eval()
    x = torch.randint(0, 61, (2, 5))
    a = model.generate(x, 20, generator=torch.Generator().manual_seed(1))  # runs past block_size: cropped
    b = model.generate(x, 20, generator=torch.Generator().manual_seed(1))
    c = model.generate(x, 20, generator=torch.Generator().manual_seed(2))
    assert a.shape == (2, 25) and a.dtype == x.dtype
    assert torch.equal(a[:, :5], x) and torch.equal(a, b) and not torch.equal(a, c)
    assert int(a.min()) >= 0 and int(a.max()) < 61
    assert model.generate(x, 0).shape == (2, 5)


def test_generate_greedy_and_top_k_follow_the_logits():
    model = tiny_gpt().eval()
    x = torch.randint(0, 61, (2, 16))  # a full block: the next step must crop to the last 16
    greedy = model.generate(x, 2, temperature=0)
    assert torch.equal(greedy[:, 16], model(x).logits[:, -1].argmax(-1))
    assert torch.equal(greedy[:, 17], model(greedy[:, 1:17]).logits[:, -1].argmax(-1))
    assert torch.equal(model.generate(x, 2, top_k=1, generator=torch.Generator().manual_seed(0)), greedy)
    top3 = model(x).logits[:, -1].topk(3).indices  # (B, 3)
    for seed in range(10):
        step = model.generate(x, 1, top_k=3, temperature=2.0, generator=torch.Generator().manual_seed(seed))
        assert torch.all((step[:, -1:] == top3).any(dim=1))


def test_generate_bad_arguments_are_named():
    model = tiny_gpt()
    x = torch.zeros(1, 3, dtype=torch.long)
    with pytest.raises(ValueError, match="max_new_tokens"):
        model.generate(x, -1)
    with pytest.raises(ValueError, match="temperature"):
        model.generate(x, 1, temperature=-1.0)
    with pytest.raises(ValueError, match="top_k"):
        model.generate(x, 1, top_k=0)


# ----------------------------------------------------------------------------- BERT
def test_bert_shapes_tied_decoder_and_init():
    model = tiny_bert()
    batch = bert_batch()
    out = model(batch["input_ids"], batch["token_type_ids"], batch["attention_mask"])
    assert out.loss is None and out.logits.shape == (3, 11, 53) and out.nsp_logits.shape == (3, 2)
    wte = model.embeddings.word_embeddings.weight
    assert [n for n, p in model.named_parameters() if p.shape == wte.shape] == ["embeddings.word_embeddings.weight"]
    assert torch.all(wte[model.config.pad_token_id] == 0)
    for name, p in model.named_parameters():
        if ".ln" in name and name.endswith("weight"):
            assert torch.all(p == 1), name
        elif name.endswith("bias"):
            assert torch.all(p == 0), name


def test_bert_loss_equals_mlm_plus_nsp_cross_entropy_of_full_logits():
    model = tiny_bert()
    batch = bert_batch()
    out = model(**batch, return_logits=True)
    V = model.config.vocab_size
    mlm = F.cross_entropy(out.logits.reshape(-1, V), batch["labels"].reshape(-1), ignore_index=IGNORE_INDEX)
    nsp = F.cross_entropy(out.nsp_logits, batch["next_sentence_label"])
    torch.testing.assert_close(out.mlm_loss, mlm, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(out.nsp_loss, nsp, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(out.loss, mlm + nsp, rtol=1e-6, atol=1e-6)

    out.loss.backward(retain_graph=True)  # the full logits share the encoder's graph
    fused = grads(model)
    model.zero_grad()
    (mlm + nsp).backward()
    for name, g in grads(model).items():
        torch.testing.assert_close(fused[name], g, rtol=1e-5, atol=1e-7, msg=name)

    only_mlm = model(batch["input_ids"], batch["token_type_ids"], batch["attention_mask"], labels=batch["labels"])
    assert only_mlm.logits is None and only_mlm.nsp_loss is None
    torch.testing.assert_close(only_mlm.loss, mlm, rtol=1e-6, atol=1e-6)
    only_nsp = model(batch["input_ids"], next_sentence_label=batch["next_sentence_label"], return_logits=False)
    assert only_nsp.mlm_loss is None and only_nsp.loss is only_nsp.nsp_loss


def test_bert_with_no_masked_position_has_zero_mlm_loss():
    model = tiny_bert()
    batch = bert_batch()
    batch["labels"] = torch.full_like(batch["labels"], IGNORE_INDEX)
    out = model(**batch)
    assert out.mlm_loss.item() == 0.0
    torch.testing.assert_close(out.loss, out.nsp_loss, rtol=0, atol=0)
    out.loss.backward()
    assert torch.all(model.mlm_head.decoder_bias.grad == 0)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


def nonzero_mlm_loss(model, batch):
    """The MLM loss as the head ran before it became shape-static: on exactly the labelled rows."""
    x = model.encode(batch["input_ids"], batch["token_type_ids"], batch["attention_mask"])
    flat = batch["labels"].reshape(-1)
    picked = (flat != IGNORE_INDEX).nonzero().squeeze(1)
    logits = model.mlm_logits(model.mlm_head(x.reshape(-1, x.shape[-1])[picked]))
    return F.cross_entropy(logits, flat[picked])


# 128 positions: room for all of them without a masking rate, 64 rows at 15%.
@pytest.mark.parametrize("mlm_probability, rows", [(None, 128), (0.15, 64)])
def test_bert_mlm_rows_are_shape_static_and_match_the_labelled_rows(mlm_probability, rows):
    model = tiny_bert()
    batch = bert_batch(B=8, T=16)
    labels = batch["labels"]
    labels[0, 0] = 5  # the padding rows gather row 0: a label there must not reach the loss through them
    n, labelled = labels.numel(), labels[labels != IGNORE_INDEX]
    out = model(**batch, mlm_probability=mlm_probability)
    assert masked_capacity(n, 0.15) == 64
    assert out.masked_hidden.shape == (rows, 48) and out.masked_targets.shape == (rows,)
    assert torch.equal(out.masked_targets[: labelled.numel()], labelled)  # in order, then only padding
    assert (out.masked_targets[labelled.numel():] == IGNORE_INDEX).all()

    full = model(batch["input_ids"], batch["token_type_ids"], batch["attention_mask"]).logits  # (B, T, V)
    scored = model.mlm_logits(out.masked_hidden[: labelled.numel()])  # what evaluation scores MLM accuracy on
    torch.testing.assert_close(scored, full[labels != IGNORE_INDEX], rtol=1e-5, atol=1e-6)

    ref = nonzero_mlm_loss(model, batch)
    assert torch.equal(out.mlm_loss, ref)  # the padding rows add exactly nothing, and the mean counts real rows
    mlm_params = [(name, p) for name, p in model.named_parameters() if not name.startswith(("pooler", "nsp_head"))]
    static = torch.autograd.grad(out.mlm_loss, [p for _, p in mlm_params])
    exact = torch.autograd.grad(ref, [p for _, p in mlm_params])
    # Equal up to the order of the float32 sums over rows (bias and LayerNorm gradients sum
    # K rows instead of M): about one rounding, never more.
    for (name, _), g, g_ref in zip(mlm_params, static, exact):
        torch.testing.assert_close(g, g_ref, rtol=1e-6, atol=1e-8, msg=name)


def test_more_masked_positions_than_the_capacity_is_an_error():
    model = tiny_bert()
    batch = bert_batch(B=8, T=16)
    batch["labels"] = batch["input_ids"].clone()  # all 128 positions labelled, where a 1% rate leaves room for 64
    assert masked_capacity(128, 0.01) == 64
    with pytest.raises(RuntimeError, match="more labelled positions than capacity"):
        model(**batch, mlm_probability=0.01)
    with pytest.raises(ValueError, match=r"mlm_probability must be in \(0, 1\] or None, got 0.0"):
        model(**batch, mlm_probability=0.0)


def test_bert_padding_is_invisible_to_real_tokens():
    model = tiny_bert().eval()
    batch = bert_batch()
    real = batch["attention_mask"].bool()
    a = model(batch["input_ids"], batch["token_type_ids"], batch["attention_mask"]).logits
    changed = torch.where(real, batch["input_ids"], torch.randint(1, 53, real.shape))
    b = model(changed, batch["token_type_ids"], batch["attention_mask"]).logits
    torch.testing.assert_close(a[real], b[real], rtol=1e-6, atol=1e-6)
    assert not torch.allclose(a[~real], b[~real])
    unmasked = model(changed, batch["token_type_ids"]).logits  # without the mask, padding is attended to
    assert not torch.allclose(a[real], unmasked[real])


def test_bert_bad_inputs_are_named():
    model = tiny_bert()
    ids = torch.ones(2, 5, dtype=torch.long)
    with pytest.raises(ValueError, match="block_size is 16"):
        model(torch.ones(2, 17, dtype=torch.long))
    with pytest.raises(TypeError, match="attention_mask must be a bool or integer"):
        model(ids, attention_mask=torch.ones(2, 5))
    with pytest.raises(ValueError, match="attention_mask must have the shape of input_ids"):
        model(ids, attention_mask=torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="token_type_ids must have the shape of input_ids"):
        model(ids, token_type_ids=torch.zeros(2, 6, dtype=torch.long))
    with pytest.raises(ValueError, match=r"next_sentence_label must be a tensor of shape \(B,\)"):
        model(ids, next_sentence_label=torch.zeros(3, dtype=torch.long))


# ----------------------------------------------------------------------------- both models
def gpt_loss(model, device):
    x = torch.randint(0, 61, (2, 11), device=device)
    labels = torch.cat([x[:, 1:], torch.full((2, 1), IGNORE_INDEX, device=device)], dim=1)
    return model(x, labels).loss


def bert_loss(model, device):
    return model(**bert_batch(device=device)).loss


@pytest.mark.parametrize("build, loss_fn", [(tiny_gpt, gpt_loss), (tiny_bert, bert_loss)], ids=["gpt", "bert"])
def test_gradients_reach_every_parameter(build, loss_fn):
    model = build()
    loss_fn(model, "cpu").backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name


def test_flops_per_token_matches_a_count_of_the_matmuls():
    with torch.device("meta"):
        model = GPT(GPTConfig.preset("gpt2"))
    L, C, T, V = 12, 768, 1024, 50304
    # Per token and layer: q,k,v (3C²), output (C²), MLP (8C²) weights, two FLOPs per
    # multiply-add, three passes; scores and weighted sum over T keys; the tied head.
    matmuls = 6 * (12 * C * C * L + V * C) + 12 * L * C * T
    assert 0 < model.flops_per_token() - matmuls < 1e-3 * matmuls  # the rest: biases and LayerNorm gains
    assert model.flops_per_token(256) == model.flops_per_token() - 12 * L * C * (T - 256)


def test_bert_flops_per_token_count_the_decoder_where_mlm_runs():
    with torch.device("meta"):
        model = BERT(BertConfig.preset("bert-tiny"))
    L, C, T, V = 2, 128, 512, 30522
    assert model.flops_per_token(128) == model.flops_per_token() - 12 * L * C * (T - 128)
    # At a 15% masking rate only 15% of the tied decoder's 6·V·C FLOPs per token are spent.
    assert model.flops_per_token(mlm_fraction=0.15) == pytest.approx(model.flops_per_token() - 0.85 * 6 * V * C)


@pytest.mark.parametrize("build, loss_fn", [(tiny_gpt, gpt_loss), (tiny_bert, bert_loss)], ids=["gpt", "bert"])
def test_merging_heads_after_triton_attention_makes_no_copy(build, loss_fn, monkeypatch):
    """The op returns (B, nh, T, hs) over (B, T, nh, hs) memory: the output projection reads it in place."""
    outputs, projected = [], []

    def recording_attention(*args, **kwargs):
        outputs.append(attention(*args, **kwargs))
        return outputs[-1]

    for model_module in (gpt_module, bert_module):
        monkeypatch.setattr(model_module, "attention", recording_attention)
    model = build(backend="triton").to(TRITON_DEVICE)
    for module in model.modules():
        if isinstance(module, (gpt_module.CausalSelfAttention, bert_module.BertSelfAttention)):
            proj = module.c_proj if isinstance(module, gpt_module.CausalSelfAttention) else module.proj
            proj.register_forward_pre_hook(lambda mod, args: projected.append(args[0]))
    with torch.no_grad():
        loss_fn(model, TRITON_DEVICE)
    assert len(outputs) == len(projected) == 2
    for y, merged in zip(outputs, projected):
        B, H, T, D = y.shape
        assert merged.shape == (B, T, H * D)
        assert merged.data_ptr() == y.data_ptr()
        assert merged.untyped_storage().data_ptr() == y.untyped_storage().data_ptr()


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("build, loss_fn", [(tiny_gpt, gpt_loss), (tiny_bert, bert_loss)], ids=["gpt", "bert"])
def test_models_run_on_every_backend(backend, build, loss_fn, poisoned_empty):
    device = TRITON_DEVICE if backend == "triton" else "cpu"
    reference = build().to(device)
    model = build(backend=backend).to(device)
    model.load_state_dict(reference.state_dict())
    torch.manual_seed(1)
    ref_loss = loss_fn(reference, device)
    torch.manual_seed(1)
    loss = loss_fn(model, device)
    ref_loss.backward()
    loss.backward()
    # fp32 throughout; on a GPU the kernels' dots may run in tf32 (NOTES.md), hence the wider bound there.
    tol = dict(rtol=1e-3, atol=1e-5) if HAS_CUDA else dict(rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(loss, ref_loss, **tol)
    ref_grads = grads(reference)
    for name, g in grads(model).items():
        torch.testing.assert_close(g, ref_grads[name], **tol, msg=name)


@pytest.mark.parametrize("build, loss_fn", [(tiny_gpt, gpt_loss), (tiny_bert, bert_loss)], ids=["gpt", "bert"])
def test_config_backend_reaches_every_op_call(build, loss_fn, monkeypatch):
    seen = []

    def recording(op):
        def call(*args, backend, **kwargs):
            seen.append((op.__name__, backend))
            return op(*args, backend="torch", **kwargs)

        return call

    for model_module in (gpt_module, bert_module):
        for name in ("attention", "cross_entropy", "linear_cross_entropy"):
            if hasattr(model_module, name):
                monkeypatch.setattr(model_module, name, recording(getattr(model_module, name)))
    loss_fn(build(backend="native"), "cpu")
    assert {backend for _, backend in seen} == {"native"}
    expected = {"attention", "linear_cross_entropy"} | ({"cross_entropy"} if build is tiny_bert else set())
    assert {op for op, _ in seen} == expected
    assert sum(op == "attention" for op, _ in seen) == 2  # one per layer


# ----------------------------------------------------------------------------- sliding windows
def test_window_layer_pattern():
    """attn_window on every layer, or with global_every = K on all but layers 0, K, 2K, ...; GPT's window holds
    attn_window keys up to the query, BERT's reaches attn_window // 2 either side (ModernBERT's local_attention)."""
    def windows(model):
        blocks = model.transformer.h if isinstance(model, GPT) else model.layers
        return [block.attn.window_size for block in blocks]

    assert windows(tiny_gpt(n_layer=3)) == [None] * 3
    assert windows(tiny_gpt(n_layer=3, attn_window=8)) == [(7, 0)] * 3
    assert windows(tiny_gpt(n_layer=7, attn_window=8, global_every=3)) == [None, (7, 0), (7, 0)] * 2 + [None]
    assert windows(tiny_bert(n_layer=4, attn_window=128, global_every=3)) == [None, (64, 64), (64, 64), None]
    assert windows(tiny_bert(n_layer=2, attn_window=5, global_every=1)) == [None, None]


def explicit_mask_attention(spec_windows, calls):
    """attention as an SDPA call on an explicit boolean mask, built per layer from ``spec_windows`` (what the
    docs promise: GPT's N keys up to the query, BERT's positions at most N // 2 away), ignoring window_size."""
    def call(q, k, v, *, is_causal=False, attention_mask=None, document_ids=None, window_size=None, backend=None):
        T = q.shape[-2]
        i, j = torch.arange(T)[:, None], torch.arange(T)[None, :]
        visible = torch.ones(T, T, dtype=torch.bool)
        kind, n = spec_windows[len(calls)]
        if kind == "gpt":
            visible = (j <= i) & ((i - j < n) if n else True)
        elif n:
            visible = (i - j).abs() <= n // 2
        visible = visible[None, None]
        if attention_mask is not None:
            visible = visible & attention_mask.bool()[:, None, None, :]
        calls.append(window_size)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=visible | ~visible.any(-1, keepdim=True))
        return out * visible.any(-1, keepdim=True)

    return call


@pytest.mark.parametrize("backend", ["torch", "native", "triton"])
def test_windowed_gpt_logits_equal_an_explicit_mask(backend, monkeypatch):
    device = TRITON_DEVICE if backend == "triton" else "cpu"
    reference = tiny_gpt(n_layer=5, attn_window=4, global_every=2).eval()
    model = tiny_gpt(n_layer=5, attn_window=4, global_every=2, backend=backend).to(device).eval()
    model.load_state_dict(reference.state_dict())
    x = torch.randint(0, 61, (2, 16))
    got = model(x.to(device)).logits.cpu()
    calls = []
    monkeypatch.setattr(gpt_module, "attention", explicit_mask_attention([("gpt", n) for n in (0, 4, 0, 4, 0)], calls))
    want = reference(x).logits
    assert calls == [None, (3, 0), None, (3, 0), None]
    tol = dict(rtol=1e-3, atol=1e-4) if HAS_CUDA else dict(rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got, want, **tol)
    monkeypatch.undo()
    full = tiny_gpt(n_layer=5).eval()
    full.load_state_dict(reference.state_dict())
    assert not torch.allclose(full(x).logits, want), "the window changed nothing"


@pytest.mark.parametrize("backend", ["torch", "native"])
def test_windowed_bert_logits_equal_an_explicit_mask(backend, monkeypatch):
    reference = tiny_bert(n_layer=3, attn_window=5, global_every=3).eval()
    model = tiny_bert(n_layer=3, attn_window=5, global_every=3, backend=backend).eval()
    model.load_state_dict(reference.state_dict())
    batch = bert_batch(T=16)
    ids, types, mask = batch["input_ids"], batch["token_type_ids"], batch["attention_mask"]
    got = model(ids, types, mask).logits
    calls = []
    monkeypatch.setattr(bert_module, "attention", explicit_mask_attention([("bert", n) for n in (0, 5, 5)], calls))
    want = reference(ids, types, mask).logits
    assert calls == [None, (2, 2), (2, 2)]
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_a_window_that_covers_the_block_changes_no_bit():
    model = tiny_gpt(backend="native").eval()
    windowed = tiny_gpt(backend="native", attn_window=16).eval()
    windowed.load_state_dict(model.state_dict())
    x = torch.randint(0, 61, (2, 16))
    assert torch.equal(model(x).logits, windowed(x).logits)
    narrow = tiny_gpt(backend="native", attn_window=5).eval()
    narrow.load_state_dict(model.state_dict())
    assert torch.equal(model(x[:, :5]).logits, narrow(x[:, :5]).logits)
    assert not torch.allclose(model(x).logits, narrow(x).logits)


@pytest.mark.parametrize("kind, config", [("gpt", GPTConfig(**GPT_TINY)), ("bert", BertConfig(**BERT_TINY)),
                                          ("bert_classifier", BertClassifierConfig(**BERT_TINY))])
def test_configs_saved_before_windows_load_without_one(kind, config):
    """A config.json written before attn_window, global_every and logit_softcap existed builds the model it
    always did; one written with them builds the windowed, capped model."""
    saved = dataclasses.asdict(config)
    old = {k: v for k, v in saved.items() if k not in ("attn_window", "global_every", "logit_softcap")}
    assert set(saved) - set(old) == {"attn_window", "global_every", "logit_softcap"}
    model = build_model(kind, old)
    assert model.config == config and model.config.attn_window is None and model.config.logit_softcap is None
    windowed = build_model(kind, {**saved, "attn_window": 6, "global_every": 2, "logit_softcap": 30.0})
    assert (windowed.config.attn_window, windowed.config.global_every, windowed.config.logit_softcap) == (6, 2, 30.0)


# ----------------------------------------------------------------------------- capped logits and the z-loss
CAP = 0.5  # small next to these tiny models' logits, so that the cap changes every one of them


def capped(logits):
    return CAP * torch.tanh(logits.double() / CAP)


@pytest.mark.parametrize("backend", ["torch", "native"])
def test_gpt_logit_softcap_caps_its_logits_loss_and_samples(backend, monkeypatch):
    """The loss is the cross-entropy of the capped logits the model returns, z_loss adds z·lse² per predicted
    token (returned apart), and generate samples from the capped logits."""
    model = tiny_gpt(logit_softcap=CAP, backend=backend).eval()
    plain = tiny_gpt().eval()
    plain.load_state_dict(model.state_dict())
    x, y = torch.randint(0, 61, (2, 9)), torch.randint(0, 61, (2, 9))
    y[0, :3] = IGNORE_INDEX
    want = capped(plain(x).logits)  # (B, T, V)
    out = model(x, labels=y, return_logits=True)
    torch.testing.assert_close(out.logits.double(), want, rtol=1e-5, atol=1e-6)
    ce = F.cross_entropy(want.view(-1, 61), y.view(-1))
    torch.testing.assert_close(out.loss.double(), ce, rtol=1e-5, atol=1e-6)
    assert out.z_loss is None
    with_z = model(x, labels=y, z_loss=0.1)
    z = 0.1 * torch.logsumexp(want, -1)[y != IGNORE_INDEX].square().mean()
    torch.testing.assert_close(with_z.z_loss.double(), z, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(with_z.loss.double(), ce + z, rtol=1e-5, atol=1e-6)
    drawn = []
    monkeypatch.setattr(torch, "multinomial", lambda probs, **kw: drawn.append(probs) or probs.argmax(-1, keepdim=True))
    model.generate(x[:, :4], 1)  # from the context x[:, :4], whose last logits are those at position 3
    torch.testing.assert_close(drawn[0].double(), want[:, 3].softmax(-1), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("backend", ["torch", "native"])
def test_bert_logit_softcap_caps_the_mlm_logits_and_loss_not_nsp(backend):
    model = tiny_bert(logit_softcap=CAP, backend=backend).eval()
    plain = tiny_bert().eval()
    plain.load_state_dict(model.state_dict())
    batch = bert_batch()
    out = model(**batch, return_logits=True, z_loss=0.1)
    ref = plain(**batch, return_logits=True)
    want = capped(ref.logits)
    torch.testing.assert_close(out.logits.double(), want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.nsp_logits, ref.nsp_logits)
    counted = batch["labels"] != IGNORE_INDEX
    ce = F.cross_entropy(want[counted], batch["labels"][counted])
    z = 0.1 * torch.logsumexp(want[counted], -1).square().mean()
    torch.testing.assert_close(out.z_loss.double(), z, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(out.mlm_loss.double(), ce + z, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.loss, out.mlm_loss + out.nsp_loss)
