"""A training step never synchronises the host with the device.

On the CPU the evidence is that the forward pass with its loss compiles into one
graph: a host read of a tensor (``.item()``, ``.nonzero()``, a branch on a value)
is a graph break, which ``fullgraph=True`` turns into an error. On CUDA a whole
training step (forward, backward, optimizer step) runs under
``torch.cuda.set_sync_debug_mode("error")``, which raises at any synchronising call.
"""

import dataclasses
from pathlib import Path

import pytest
import torch

from conftest import HAS_CUDA
from minipt import runtime
from minipt.config import TrainConfig
from minipt.models import BERT, GPT, BertConfig, GPTConfig
from minipt.ops import IGNORE_INDEX
from minipt import pretraining as P


def gpt_forward():
    model = GPT(GPTConfig(vocab_size=61, block_size=16, n_layer=2, n_head=3, n_embd=48, backend="torch"))
    x = torch.randint(0, 61, (2, 16))
    labels = torch.cat([x[:, 1:], torch.full((2, 1), IGNORE_INDEX)], dim=1)
    return model, (x,), dict(labels=labels)


def gpt_documents_forward():
    model = GPT(GPTConfig(vocab_size=61, block_size=16, n_layer=2, n_head=3, n_embd=48, doc_sep_id=0,
                          reset_positions=True, backend="torch"))
    x = torch.randint(0, 61, (2, 16))
    x[:, [0, 5, 6, 12]] = 0  # documents of 5, 1, 6 and 4 tokens, each opened by its separator
    labels = torch.cat([x[:, 1:], torch.full((2, 1), IGNORE_INDEX)], dim=1)
    return model, (x,), dict(labels=labels)


def bert_forward():
    model = BERT(BertConfig(vocab_size=53, block_size=16, n_layer=2, n_head=3, n_embd=48, dropout=0.0, backend="torch"))
    ids = torch.randint(1, 53, (8, 16))
    mask = torch.ones(8, 16, dtype=torch.long)
    mask[1, 10:] = 0
    labels = torch.where(torch.rand(8, 16) < 0.15, ids, IGNORE_INDEX)
    kwargs = dict(
        token_type_ids=torch.zeros_like(ids), attention_mask=mask, labels=labels,
        next_sentence_label=torch.tensor([0, 1] * 4), mlm_probability=0.15,
    )
    return model, (ids,), kwargs


def bert_packed_forward():
    model, (ids,), kwargs = bert_forward()
    kwargs.update(
        document_ids=(torch.arange(16) >= 7).long().expand(8, 16),  # two pairs a row: positions 0-6 and 7-15
        position_ids=torch.cat([torch.arange(7), torch.arange(9)]).expand(8, 16),
        cls_positions=torch.tensor([0, 7, 0]).expand(8, 3),
        next_sentence_label=torch.tensor([0, 1, IGNORE_INDEX]).repeat(8, 1),
    )
    return model, (ids,), kwargs


def capped_with_z_loss(make):
    """``make``'s model with soft-capped logits, called with a z-loss, whose term comes back apart."""
    def capped():
        model, args, kwargs = make()
        model.config = dataclasses.replace(model.config, logit_softcap=30.0)
        return model, args, dict(kwargs, z_loss=1e-4)
    return capped


@pytest.mark.parametrize("make", [
    gpt_forward, bert_forward, gpt_documents_forward, bert_packed_forward, capped_with_z_loss(gpt_forward),
    capped_with_z_loss(bert_forward),
], ids=["gpt", "bert", "gpt-doc_mask", "bert-pack", "gpt-softcap-z_loss", "bert-softcap-z_loss"])
def test_forward_and_loss_compile_without_a_graph_break(make):
    torch._dynamo.reset()
    model, args, kwargs = make()
    eager = model(*args, **kwargs).loss
    # The "eager" backend runs what Dynamo captured as it is: it checks the capture, not inductor's code.
    compiled = torch.compile(model, fullgraph=True, backend="eager")(*args, **kwargs).loss
    torch.testing.assert_close(compiled, eager, rtol=0, atol=0)


# ----------------------------------------------------------------------------- CUDA
def tiny_run(tmp_path: Path, model: str, **options) -> P.Run:
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for d in range(3):
        text = "\n\n".join(f"VOICE{d}:\nNow is the winter of our discontent, line {i}." for i in range(30))
        (corpus / f"doc{d}.txt").write_text(text + "\n", encoding="utf-8")
    cfg = TrainConfig(
        model=model, data=str(corpus), tokenizer="wordpiece" if model == "bert" else "char", vocab_size=200,
        cache_dir=str(tmp_path / "cache"), out_dir=str(tmp_path / "run"), n_layer=2, n_head=2, n_embd=32,
        block_size=32, batch_size=4, gradient_accumulation_steps=2, eval_iters=1, device="cuda", **options,
    )
    return P.Run(cfg, runtime.setup(cfg.device, cfg.dtype, cfg.tf32), log=lambda *a: None)


@pytest.mark.skipif(not HAS_CUDA, reason="set_sync_debug_mode watches CUDA synchronisation; a CPU has none to watch")
@pytest.mark.parametrize("model, options", [
    ("gpt", {}), ("bert", {}), ("gpt", dict(doc_mask=True, reset_positions=True)), ("bert", dict(pack=True)),
    ("gpt", dict(logit_softcap=30.0, z_loss=1e-4)), ("bert", dict(logit_softcap=30.0, z_loss=1e-4)),
], ids=["gpt", "bert", "gpt-doc_mask", "bert-pack", "gpt-softcap-z_loss", "bert-softcap-z_loss"])
def test_a_training_step_never_syncs(tmp_path, model, options):
    run = tiny_run(tmp_path, model, **options)
    run.step()  # the first step compiles the Triton kernels and initialises cuBLAS, which may sync once
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        loss, z_loss = run.step()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert torch.isfinite(loss).item()
    assert (z_loss is None) == ("z_loss" not in options) and (z_loss is None or z_loss.item() > 0)


def test_decreasing_document_ids_stop_a_compiled_graph_too():
    from minipt.ops import attention

    torch._dynamo.reset()
    q = torch.randn(2, 1, 8, 4)
    ordered, unordered = torch.tensor([[0, 0, 1, 1, 1, 2, 2, 2]] * 2), torch.tensor([[0, 0, 1, 1, 0, 0, 1, 1]] * 2)
    attend = torch.compile(lambda d: attention(q, q, q, document_ids=d, backend="torch"), fullgraph=True,
                           backend="eager")
    torch.testing.assert_close(attend(ordered), attention(q, q, q, document_ids=ordered, backend="torch"))
    with pytest.raises(RuntimeError, match="document_ids must be non-decreasing along each row"):
        attend(unordered)
