"""Hugging Face interop: the same weights give the same logits and losses, both ways.

The HF models are small and odd-sized, with weights drawn at std 0.2 (ten times
the usual init), so a transposed, swapped or misplaced tensor changes the output
well beyond the tolerance instead of hiding under small activations.
"""

import sys

import pytest
import torch
import transformers

from minipt.hf import ExportRefused, from_hf, to_hf
from minipt.models import BERT, GPT, BertClassifier, BertClassifierConfig, BertConfig, GPTConfig
from minipt.ops import IGNORE_INDEX

V, T_MAX, C, H, L = 97, 40, 48, 3, 2
TOL = dict(rtol=1e-4, atol=1e-5)


def scramble(model, std=0.2):
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, std)
    return model


def hf_gpt2(attn="eager", **overrides):
    config = transformers.GPT2Config(
        vocab_size=V, n_positions=T_MAX, n_embd=C, n_layer=L, n_head=H, bos_token_id=None, eos_token_id=None,
        attn_implementation=attn, **overrides,
    )
    return scramble(transformers.GPT2LMHeadModel(config)).eval()


def hf_bert(attn="eager", **overrides):
    config = transformers.BertConfig(
        vocab_size=V, max_position_embeddings=T_MAX, hidden_size=C, num_hidden_layers=L, num_attention_heads=H,
        intermediate_size=80, type_vocab_size=2, attn_implementation=attn, **overrides,
    )
    return scramble(transformers.BertForPreTraining(config)).eval()


def build_with(build, attn):
    """``build(attn)``; a transformers release without SDPA for this model skips the "sdpa" case, saying so."""
    try:
        return build(attn)
    except ValueError as exc:
        if attn == "sdpa" and "scaled_dot_product_attention" in str(exc):
            pytest.skip(f"transformers {transformers.__version__} has no SDPA path for this model: {exc}")
        raise


def padded_batch(B=3, T=17):
    """Right padding with three different lengths, and both token types in every row."""
    lengths = torch.tensor([T, 11, 4])[:B]
    mask = torch.arange(T)[None, :] < lengths[:, None]  # (B, T)
    input_ids = torch.randint(1, V, (B, T)).masked_fill(~mask, 0)
    token_type_ids = (torch.arange(T)[None, :] >= (lengths[:, None] // 2)).long() * mask
    return input_ids, token_type_ids, mask.long()


def assert_same_state(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key


# ----------------------------------------------------------------------------- GPT-2
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_gpt2_logits_match(attn):
    hf = build_with(hf_gpt2, attn)
    model = from_hf(hf, backend="torch").eval()
    cfg = model.config
    assert (cfg.vocab_size, cfg.block_size, cfg.n_layer, cfg.n_head, cfg.n_embd) == (V, T_MAX, L, H, C)
    assert cfg.layer_norm_eps == hf.config.layer_norm_epsilon
    input_ids, _, mask = padded_batch()
    with torch.no_grad():
        theirs = hf(input_ids, attention_mask=mask).logits
        ours = model(input_ids).logits
    # A causal model's real tokens never see the right padding after them.
    real = mask.bool()
    torch.testing.assert_close(ours[real], theirs[real], **TOL)
    assert theirs.abs().max() > 1e4 * TOL["atol"]  # far above atol: a wrong weight cannot hide under it


def test_gpt2_loss_matches():
    hf = hf_gpt2()
    model = from_hf(hf, backend="torch").eval()
    input_ids = torch.randint(0, V, (2, 23))
    labels = input_ids.clone()
    labels[0, 5:9] = IGNORE_INDEX
    with torch.no_grad():
        theirs = hf(input_ids, labels=labels).loss  # HF shifts the labels itself
        shifted = torch.cat([labels[:, 1:], torch.full((2, 1), IGNORE_INDEX)], dim=1)
        ours = model(input_ids, shifted).loss
    torch.testing.assert_close(ours, theirs, **TOL)


# The round trips compare outputs at 1e-6, not bit for bit: to_hf builds its model with
# the installed transformers' default attention, which may not be the one used here.
def test_gpt2_round_trips():
    hf = hf_gpt2()
    back = to_hf(from_hf(hf)).eval()
    assert isinstance(back, transformers.GPT2LMHeadModel)
    assert_same_state(back, hf)
    input_ids = torch.randint(0, V, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(back(input_ids).logits, hf(input_ids).logits, rtol=1e-6, atol=1e-6)

    model = GPT(GPTConfig(vocab_size=V, block_size=T_MAX, n_layer=L, n_head=H, n_embd=C, backend="torch"))
    assert_same_state(from_hf(to_hf(model)), model)


def test_gpt_without_biases_exports_zero_biases():
    model = scramble(GPT(GPTConfig(vocab_size=V, block_size=T_MAX, n_layer=L, n_head=H, n_embd=C, bias=False)))
    model.eval()
    hf = to_hf(model).eval()
    assert all(torch.all(p == 0) for n, p in hf.named_parameters() if n.endswith(".bias"))
    input_ids = torch.randint(0, V, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids).logits, hf(input_ids).logits, **TOL)


def test_dtype_and_device_are_kept_without_rounding():
    hf = hf_gpt2().double()
    model = from_hf(hf, backend="torch").eval()
    assert all(p.dtype == torch.float64 for p in model.parameters())
    input_ids = torch.randint(0, V, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids).logits, hf(input_ids).logits, rtol=1e-10, atol=1e-10)
    assert next(to_hf(model).parameters()).dtype == torch.float64


# ----------------------------------------------------------------------------- BERT
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_bert_logits_match_at_real_positions(attn):
    hf = build_with(hf_bert, attn)
    model = from_hf(hf, backend="torch").eval()
    cfg = model.config
    assert (cfg.vocab_size, cfg.block_size, cfg.n_layer, cfg.n_head, cfg.n_embd, cfg.inner_size) == (
        V, T_MAX, L, H, C, 80,
    )
    assert cfg.layer_norm_eps == hf.config.layer_norm_eps and cfg.pad_token_id == hf.config.pad_token_id
    input_ids, token_type_ids, mask = padded_batch()
    with torch.no_grad():
        theirs = hf(input_ids, token_type_ids=token_type_ids, attention_mask=mask)
        ours = model(input_ids, token_type_ids, mask)
    real = mask.bool()
    torch.testing.assert_close(ours.logits[real], theirs.prediction_logits[real], **TOL)
    torch.testing.assert_close(ours.nsp_logits, theirs.seq_relationship_logits, **TOL)
    assert theirs.prediction_logits.abs().max() > 1e4 * TOL["atol"]


def test_bert_losses_match():
    hf = hf_bert()
    model = from_hf(hf, backend="torch").eval()
    input_ids, token_type_ids, mask = padded_batch()
    labels = torch.where(mask.bool() & (torch.rand(mask.shape) < 0.3), torch.randint(0, V, mask.shape), IGNORE_INDEX)
    labels[2, 1] = 5
    nsp = torch.tensor([1, 0, 1])
    with torch.no_grad():
        theirs = hf(input_ids, token_type_ids=token_type_ids, attention_mask=mask, labels=labels,
                    next_sentence_label=nsp)
        ours = model(input_ids, token_type_ids, mask, labels=labels, next_sentence_label=nsp)
    torch.testing.assert_close(ours.loss, theirs.loss, **TOL)
    V_ = hf.config.vocab_size
    mlm = torch.nn.functional.cross_entropy(theirs.prediction_logits.reshape(-1, V_), labels.reshape(-1))
    torch.testing.assert_close(ours.mlm_loss, mlm, **TOL)


def test_bert_round_trips():
    hf = hf_bert()
    back = to_hf(from_hf(hf)).eval()
    assert isinstance(back, transformers.BertForPreTraining)
    assert_same_state(back, hf)
    input_ids, token_type_ids, mask = padded_batch()
    with torch.no_grad():
        a = back(input_ids, token_type_ids=token_type_ids, attention_mask=mask)
        b = hf(input_ids, token_type_ids=token_type_ids, attention_mask=mask)
    torch.testing.assert_close(a.prediction_logits, b.prediction_logits, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(a.seq_relationship_logits, b.seq_relationship_logits, rtol=1e-6, atol=1e-6)

    model = BERT(BertConfig(vocab_size=V, block_size=T_MAX, n_layer=L, n_head=H, n_embd=C, n_inner=80))
    assert_same_state(from_hf(to_hf(model)), model)


# ----------------------------------------------------------------------------- refusals
@pytest.mark.parametrize(
    "build, overrides, pattern",
    [
        (hf_gpt2, dict(activation_function="relu"), "activation_function='relu'"),
        (hf_gpt2, dict(n_inner=100), "n_inner=100"),
        (hf_gpt2, dict(scale_attn_by_inverse_layer_idx=True), "scale_attn_by_inverse_layer_idx"),
        (hf_gpt2, dict(scale_attn_weights=False), "scale_attn_weights"),
        (hf_gpt2, dict(tie_word_embeddings=False), "lm_head.weight differs"),
        (hf_bert, dict(hidden_act="relu"), "hidden_act='relu'"),
        (hf_bert, dict(is_decoder=True), "is_decoder"),
        (hf_bert, dict(tie_word_embeddings=False), "decoder.weight differs"),
    ],
)
def test_unrepresentable_configs_are_refused(build, overrides, pattern):
    with pytest.raises(ValueError, match=pattern):
        from_hf(build(**overrides))


@pytest.mark.parametrize("model", [
    GPT(GPTConfig(vocab_size=V, block_size=T_MAX, n_layer=L, n_head=H, n_embd=C, attn_window=8)),
    BERT(BertConfig(vocab_size=V, block_size=T_MAX, n_layer=3, n_head=H, n_embd=C, attn_window=16, global_every=3)),
    BertClassifier(BertClassifierConfig(vocab_size=V, block_size=T_MAX, n_layer=L, n_head=H, n_embd=C, attn_window=4)),
], ids=["gpt", "bert", "classifier"])
def test_windowed_models_are_refused_by_name(model):
    """GPT-2 and BERT attend to every position: a sliding-window model would export as another model."""
    with pytest.raises(ExportRefused, match=rf"sliding window \(attn_window={model.config.attn_window}, global_every="):
        to_hf(model)
    assert issubclass(ExportRefused, ValueError)


@pytest.mark.parametrize("cls, config_cls, head", [(GPT, GPTConfig, "LM"), (BERT, BertConfig, "MLM")])
def test_softcapped_models_are_refused_by_name(cls, config_cls, head):
    """GPT-2's and BERT's heads have no cap: a soft-capped model would export as another model."""
    model = cls(config_cls(vocab_size=V, block_size=T_MAX, n_layer=L, n_head=H, n_embd=C, logit_softcap=30.0))
    with pytest.raises(ExportRefused, match=rf"caps its {head} logits \(logit_softcap=30.0\)"):
        to_hf(model)


def test_a_classifier_from_a_softcapped_bert_exports_as_it_is():
    """The cap is the MLM head's, which a BertForSequenceClassification leaves out: the classifier exports,
    and its logits are ours."""
    model = BertClassifier(BertClassifierConfig(vocab_size=V, block_size=T_MAX, n_layer=L, n_head=H, n_embd=C,
                                                logit_softcap=30.0)).eval()
    ids = torch.randint(1, V, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(to_hf(model).eval()(ids).logits, model(ids), rtol=1e-5, atol=1e-5)


def test_wrong_model_types_are_refused():
    with pytest.raises(TypeError, match="GPT2LMHeadModel or transformers.BertForPreTraining"):
        from_hf(transformers.GPT2Model(transformers.GPT2Config(vocab_size=V, n_embd=C, n_layer=1, n_head=H)))
    with pytest.raises(TypeError, match="minipt.models.GPT, BERT or BertClassifier"):
        to_hf(torch.nn.Linear(2, 2))


def test_missing_transformers_is_a_clear_import_error(monkeypatch):
    model = GPT(GPTConfig.preset("gpt-tiny"))
    monkeypatch.setitem(sys.modules, "transformers", None)
    with pytest.raises(ImportError, match="optional dependency `transformers`"):
        to_hf(model)
