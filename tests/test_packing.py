"""Packed rows: GPT documents kept apart inside a window (``--doc_mask``), BERT pairs packed several to a
row (``--pack``), each the same as when run alone; the packer, its padding figures, and what is refused."""

import random
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from conftest import TRITON_DEVICE
from minipt import train as T
from minipt.config import ConfigError, TrainConfig
from minipt.data import PairInstance, PairSampler, RowPacker, TokenShard, TokenSplit, collate_packed, collate_pairs
from minipt.data import pair_batches, pair_slots
from minipt.models import BERT, GPT, BertConfig, GPTConfig, build_model
from minipt.ops import IGNORE_INDEX, mlm_mask
from minipt.runtime import setup
from minipt import pretraining as P
from minipt import evaluation as EV
from minipt.config import EvalConfig, parse_overrides
from minipt.load import load_run


def resolve_config(argv):
    """The config ``python -m minipt.train`` resolves from ``argv``."""
    return P.resolve_config(parse_overrides(TrainConfig, argv, "", ""))

SEP = 1  # the GPT models' <|endoftext|>
TOK = SimpleNamespace(pad_id=0, cls_id=2, sep_id=3, mask_id=4)  # what the collates read of a BERT tokenizer
GPT_TINY = dict(vocab_size=41, block_size=24, n_layer=2, n_head=2, n_embd=32, dropout=0.0)
BERT_TINY = dict(vocab_size=43, block_size=32, n_layer=2, n_head=2, n_embd=32, n_inner=40, dropout=0.0)
# (backend, dtype, tolerance): float64 on torch; the Triton kernels take fp32 (in the interpreter on a CPU)
BACKENDS = [("torch", torch.float64, 1e-10), ("triton", torch.float32, 2e-5)]


def gpt_window(T=20):
    """Two rows of separator-opened documents; row 0 starts inside a document, as a random window does."""
    rows = [[9, 12, 5, SEP, 7, 8, 30, 11, 6, SEP, 14, 15, 16, 17, 2, SEP, 20, 21, 22, 23],
            [SEP, 25, 26, 27, 28, 29, 31, 32, 33, SEP, 34, SEP, 35, 36, 37, 38, 39, 40, 3, 4]]
    return torch.tensor(rows)[:, :T]


def spans(row: torch.Tensor) -> list[tuple[int, int]]:
    starts = [0] + [i for i in range(1, len(row)) if row[i] == SEP]
    return list(zip(starts, starts[1:] + [len(row)]))


@pytest.mark.parametrize("backend, dtype, tol", BACKENDS)
def test_gpt_documents_in_a_window_score_as_each_alone(backend, dtype, tol):
    device = TRITON_DEVICE if backend == "triton" else "cpu"
    reset = GPT(GPTConfig(**GPT_TINY, doc_sep_id=SEP, reset_positions=True, backend=backend)).to(device, dtype).eval()
    shifted = build_model("gpt", {**GPT_TINY, "doc_sep_id": SEP, "backend": backend}).to(device, dtype).eval()
    shifted.load_state_dict(reset.state_dict())
    plain = build_model("gpt", {**GPT_TINY, "backend": backend}).to(device, dtype).eval()
    plain.load_state_dict(reset.state_dict())
    ids = gpt_window().to(device)
    with torch.no_grad():
        packed, unreset, mixed = reset(ids).logits, shifted(ids).logits, plain(ids).logits
        for b in range(ids.shape[0]):
            for s, e in spans(ids[b]):
                alone = reset(ids[b:b + 1, s:e]).logits[0]
                torch.testing.assert_close(packed[b, s:e], alone, rtol=tol, atol=tol)
                at_offset = plain(ids[b:b + 1, s:e], position_ids=torch.arange(s, e, device=device)[None]).logits[0]
                torch.testing.assert_close(unreset[b, s:e], at_offset, rtol=tol, atol=tol)
    # The check has teeth: without the document mask a later document sees the earlier ones.
    s, e = spans(ids[0])[2]
    assert (mixed[0, s:e] - packed[0, s:e]).abs().max() > 1e-3


def test_gpt_packed_gradients_are_the_sum_of_each_documents():
    model = GPT(GPTConfig(**GPT_TINY, doc_sep_id=SEP, reset_positions=True, backend="torch")).double()
    ids = gpt_window()[:1]
    targets = torch.roll(ids, -1, 1)
    targets[:, -1] = IGNORE_INDEX
    targets[torch.roll(ids, -1, 1) == SEP] = IGNORE_INDEX  # a document's last token does not predict the next one
    n = int((targets != IGNORE_INDEX).sum())
    (model(ids, labels=targets).loss * n).backward()
    packed = {k: p.grad.clone() for k, p in model.named_parameters()}
    model.zero_grad()
    for s, e in spans(ids[0]):
        part = targets[:, s:e]
        (model(ids[:, s:e], labels=part).loss * int((part != IGNORE_INDEX).sum())).backward()
    for name, p in model.named_parameters():
        torch.testing.assert_close(packed[name], p.grad, rtol=1e-9, atol=1e-12, msg=name)


# ----------------------------------------------------------------------------- BERT
def pair(rng: random.Random, la: int, lb: int) -> PairInstance:
    return PairInstance(np.array([rng.randint(5, 42) for _ in range(la)]),
                        np.array([rng.randint(5, 42) for _ in range(lb)]), rng.random() < 0.5)


def some_pairs(seed=0, n=7):
    rng = random.Random(seed)
    return [pair(rng, rng.randint(1, 9), rng.randint(1, 9)) for _ in range(n)]


def packed_rows(instances, block_size=32):
    packer = RowPacker(block_size)
    for x in instances:
        packer.add(x)
    return packer.rows


def as_tensors(batch: dict) -> dict:
    return {k: torch.from_numpy(v) for k, v in batch.items()}


@pytest.mark.parametrize("backend, dtype, tol", BACKENDS)
def test_bert_packed_pairs_score_as_each_alone(backend, dtype, tol):
    device = TRITON_DEVICE if backend == "triton" else "cpu"
    model = BERT(BertConfig(**BERT_TINY, backend=backend)).to(device, dtype).eval()
    instances = some_pairs()
    rows = packed_rows(instances)
    assert len(rows) < len(instances)  # several pairs share a row
    batch = {k: v.to(device) for k, v in as_tensors(collate_packed(rows, TOK, 32)).items()}
    with torch.no_grad():
        out = model(batch["input_ids"], batch["token_type_ids"], batch["attention_mask"],
                    position_ids=batch["position_ids"], document_ids=batch["document_ids"],
                    cls_positions=batch["cls_positions"])
        assert out.nsp_logits.shape == (len(rows), pair_slots(32), 2)
        for row, pairs in enumerate(rows):
            start = 0
            for slot, x in enumerate(pairs):
                alone = {k: v.to(device) for k, v in as_tensors(collate_pairs([x], TOK, 32)).items()}
                ref = model(alone["input_ids"], alone["token_type_ids"], alone["attention_mask"])
                length = len(x.tokens_a) + len(x.tokens_b) + 3
                torch.testing.assert_close(out.nsp_logits[row, slot], ref.nsp_logits[0], rtol=tol, atol=tol)
                torch.testing.assert_close(out.logits[row, start:start + length], ref.logits[0, :length],
                                           rtol=tol, atol=tol)
                start += length


def test_bert_packed_gradients_are_the_sum_of_each_pairs():
    model = BERT(BertConfig(**BERT_TINY, backend="torch")).double().eval()
    rows = packed_rows(some_pairs(seed=1, n=6))
    batch = as_tensors(collate_packed(rows, TOK, 32))
    weights = torch.randn(64, 43, dtype=torch.float64)  # a weight per (position in its pair, vocabulary entry)

    def score(out, positions, real):  # a loss that reads every MLM logit of the real tokens and the NSP logits
        return (out.logits * weights[positions] * real[..., None]).sum() + out.nsp_logits[..., 1].sum()

    out = model(batch["input_ids"], batch["token_type_ids"], batch["attention_mask"],
                position_ids=batch["position_ids"], document_ids=batch["document_ids"],
                cls_positions=batch["cls_positions"])
    filled = (batch["next_sentence_label"] != IGNORE_INDEX).double()
    out.nsp_logits = out.nsp_logits * filled[..., None]
    score(out, batch["position_ids"], batch["attention_mask"].double()).backward()
    packed = {k: p.grad.clone() for k, p in model.named_parameters()}
    model.zero_grad()
    for x in (x for row in rows for x in row):
        alone = as_tensors(collate_pairs([x], TOK, 32))
        out = model(alone["input_ids"], alone["token_type_ids"], alone["attention_mask"])
        score(out, torch.arange(alone["input_ids"].shape[1])[None], alone["attention_mask"].double()).backward()
    for name, p in model.named_parameters():
        torch.testing.assert_close(packed[name], p.grad, rtol=1e-9, atol=1e-12, msg=name)


def test_bert_packed_training_step_updates_every_weight():
    model = BERT(BertConfig(**BERT_TINY, backend="torch"))
    batch = as_tensors(collate_packed(packed_rows(some_pairs(n=9)), TOK, 32))
    masked, labels = mlm_mask(batch["input_ids"], mask_token_id=TOK.mask_id, vocab_size=43,
                              special_tokens_mask=batch["special_tokens_mask"], mlm_probability=0.3, seed=3)
    out = model(masked, batch["token_type_ids"], batch["attention_mask"], labels=labels,
                next_sentence_label=batch["next_sentence_label"], position_ids=batch["position_ids"],
                document_ids=batch["document_ids"], cls_positions=batch["cls_positions"], mlm_probability=0.3)
    assert torch.isfinite(out.loss) and out.nsp_loss > 0 and out.mlm_loss > 0
    before = {k: p.detach().clone() for k, p in model.named_parameters()}
    out.loss.backward()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    optimizer.step()
    for name, p in model.named_parameters():
        assert not torch.equal(p.detach(), before[name]), f"{name} did not change"


def test_packed_nsp_loss_ignores_the_empty_slots():
    model = BERT(BertConfig(**BERT_TINY, backend="torch")).double().eval()
    rows = packed_rows(some_pairs(n=5))
    batch = as_tensors(collate_packed(rows, TOK, 32))
    labels = batch["next_sentence_label"]
    assert (labels == IGNORE_INDEX).sum() == labels.numel() - 5
    out = model(batch["input_ids"], batch["token_type_ids"], batch["attention_mask"], next_sentence_label=labels,
                position_ids=batch["position_ids"], document_ids=batch["document_ids"],
                cls_positions=batch["cls_positions"])
    filled = labels != IGNORE_INDEX
    expected = torch.nn.functional.cross_entropy(out.nsp_logits[filled], labels[filled])
    torch.testing.assert_close(out.nsp_loss, expected)


# ----------------------------------------------------------------------------- the packer and its figures
def test_collate_packed_lays_out_each_pair_as_its_own_document():
    a = PairInstance(np.array([10, 11]), np.array([12]), False)
    b = PairInstance(np.array([20, 21, 22]), np.array([23, 24]), True)
    batch = collate_packed([[a, b]], TOK, 16)
    cls, sep, pad = TOK.cls_id, TOK.sep_id, TOK.pad_id
    assert batch["input_ids"][0].tolist() == [cls, 10, 11, sep, 12, sep, cls, 20, 21, 22, sep, 23, 24, sep, pad, pad]
    assert batch["token_type_ids"][0].tolist() == [0, 0, 0, 0, 1, 1, 0, 0, 0, 0, 0, 1, 1, 1, 0, 0]
    assert batch["position_ids"][0].tolist() == [0, 1, 2, 3, 4, 5, 0, 1, 2, 3, 4, 5, 6, 7, 0, 0]
    assert batch["document_ids"][0].tolist() == [0] * 6 + [1] * 8 + [2, 2]
    assert batch["attention_mask"][0].tolist() == [True] * 14 + [False] * 2
    assert batch["special_tokens_mask"][0].tolist() == (
        [True, False, False, True, False, True, True, False, False, False, True, False, False, True, True, True])
    assert batch["cls_positions"].tolist() == [[0, 6, 0]]  # 16 // 5 = 3 slots
    assert batch["next_sentence_label"].tolist() == [[0, 1, IGNORE_INDEX]]


def lengths_pairs(lengths):
    """Pairs of the given total lengths (A gets one token, B the rest)."""
    return [PairInstance(np.array([7]), np.array([8] * (n - 4)), False) for n in lengths]


def test_padding_shares_on_a_hand_checked_case():
    # lengths 10, 6, 20, 5 at block_size 32, two per batch:
    # unpacked: widths 16 (10 and 6) and 24 (20 and 5): 80 positions for 41 tokens
    # packed first fit: row 0 takes 10, 6 and 5 (21), row 1 takes 20: one batch 24 wide, 48 positions
    instances = lengths_pairs([10, 6, 20, 5])
    batches, unpacked = pair_batches(instances, TOK, 32, 2, pack=False)
    assert unpacked == {"pad_share": pytest.approx(1 - 41 / 80)}
    assert sum(b["attention_mask"].size for b in batches) == 80
    batches, packed = pair_batches(instances, TOK, 32, 2, pack=True)
    assert packed == {"pad_share": pytest.approx(1 - 41 / 48), "unpacked_pad_share": pytest.approx(1 - 41 / 80)}
    assert len(batches) == 1 and batches[0]["attention_mask"].sum(1).tolist() == [21, 20]
    assert batches[0]["input_ids"].shape == (2, 24) and batches[0]["cls_positions"].shape == (2, pair_slots(32))


def test_first_fit_fills_gaps_and_stops_at_the_first_pair_that_fits_nowhere():
    packer = RowPacker(32, max_rows=2)
    assert [packer.add(x) for x in lengths_pairs([30, 20, 5, 12])] == [True, True, True, False]
    assert [[len(x.tokens_a) + len(x.tokens_b) + 3 for x in row] for row in packer.rows] == [[30], [20, 5]]
    with pytest.raises(ValueError, match="a pair of 33 tokens cannot fit a row of block_size=32"):
        packer.add(lengths_pairs([33])[0])


def token_split(seed=0, n_docs=4, n_segments=12) -> TokenSplit:
    rng = np.random.default_rng(seed)
    docs = [[rng.integers(5, 42, rng.integers(2, 9)) for _ in range(n_segments)] for _ in range(n_docs)]
    segments = [s for d in docs for s in d]
    return TokenSplit([TokenShard(np.concatenate(segments).astype(np.uint16), np.cumsum([0] + [len(d) for d in docs]),
                                  np.cumsum([0] + [len(s) for s in segments]))])


def test_packed_sampler_resumes_exactly_and_splits_rows_across_ranks():
    sampler = PairSampler(token_split(), TOK, 32, 3, short_seq_prob=0.5, seed=2, pack=True)
    first = sampler.next_step(2)
    state = sampler.state_dict()
    later = [sampler.next_step(1)[0] for _ in range(4)]
    fresh = PairSampler(token_split(), TOK, 32, 3, short_seq_prob=0.5, seed=2, pack=True)
    fresh.load_state_dict(state)
    for a, b in zip(later, [fresh.next_step(1)[0] for _ in range(4)]):
        assert all(np.array_equal(a[k], b[k]) for k in a)
    batch = first[0]
    assert batch["input_ids"].shape[0] == 3 and batch["cls_positions"].shape == (3, pair_slots(32))
    assert (batch["next_sentence_label"] != IGNORE_INDEX).sum(1).max() > 1  # some row holds several pairs
    whole = PairSampler(token_split(), TOK, 32, 4, 0.5, seed=7, pack=True).next_step(1)[0]
    halves = [PairSampler(token_split(), TOK, 32, 2, 0.5, seed=7, rank=r, world_size=2, pack=True).next_step(1)[0]
              for r in (0, 1)]
    for k in whole:
        assert np.array_equal(whole[k], np.concatenate([h[k] for h in halves])), k


def packed_pairs(batch: dict) -> list[tuple]:
    """Each pair of a packed batch, read back from its row by its document id."""
    out = []
    for ids, documents, labels in zip(batch["input_ids"], batch["document_ids"], batch["next_sentence_label"]):
        out += [tuple(ids[documents == slot].tolist()) for slot in np.flatnonzero(labels != IGNORE_INDEX)]
    return out


def as_pair(x: PairInstance) -> tuple:
    return (TOK.cls_id, *x.tokens_a.tolist(), TOK.sep_id, *x.tokens_b.tolist(), TOK.sep_id)


def test_packed_sampler_drops_no_pair_and_holds_none_back_more_than_one_step():
    split = token_split(n_docs=8, n_segments=20)  # 56 pairs: six steps stay in the first epoch
    packed = PairSampler(split, TOK, 32, 4, 0.5, seed=3, pack=True)
    placed, waited, waits = [], [], []
    for _ in range(6):
        step = packed_pairs(packed.next_step(1)[0])
        assert set(waited) <= set(step)  # the pairs the last step left waiting come first
        waited = [as_pair(x) for x in packed.waiting]
        assert len(waited) <= 4  # so each fits the next step's 4 rows
        placed += step
        waits.append(len(waited))
    assert packed.state_dict()["epoch"] == 0 and max(waits) > 0  # the look-ahead was used
    plain = PairSampler(split, TOK, 32, 1, 0.5, seed=3)
    read = [plain.next_step(1)[0] for _ in range(packed.state_dict()["position"])]
    # every pair read is placed or waiting, none twice
    assert sorted(placed + waited) == sorted(tuple(b["input_ids"][0][b["attention_mask"][0]].tolist()) for b in read)


# ----------------------------------------------------------------------------- configs and bad input
def test_gpt_config_document_fields_and_old_configs():
    old = build_model("gpt", {k: v for k, v in GPT_TINY.items()})  # a config.json saved before these fields
    assert old.config.doc_sep_id is None and old.config.reset_positions is False
    with pytest.raises(ValueError, match=r"doc_sep_id must be in \[0, vocab_size=41\), got 41"):
        GPTConfig(**GPT_TINY, doc_sep_id=41)
    with pytest.raises(TypeError, match="doc_sep_id must be an int, got str"):
        GPTConfig(**GPT_TINY, doc_sep_id="1")
    with pytest.raises(ValueError, match="reset_positions needs doc_sep_id"):
        GPTConfig(**GPT_TINY, reset_positions=True)
    with pytest.raises(ValueError, match=r"GPT: position_ids must have the shape of input_ids \(1, 4\)"):
        old(torch.ones(1, 4, dtype=torch.long), position_ids=torch.arange(3)[None])


def test_bert_packed_inputs_are_checked():
    model = BERT(BertConfig(**BERT_TINY, backend="torch"))
    ids = torch.randint(5, 40, (2, 10))
    with pytest.raises(ValueError, match=r"cls_positions must have shape \(B, S\) = \(2, S >= 1\), got \(3, 2\)"):
        model(ids, cls_positions=torch.zeros(3, 2, dtype=torch.long))
    with pytest.raises(TypeError, match="cls_positions must be an int32 or int64 tensor"):
        model(ids, cls_positions=torch.zeros(2, 2))
    with pytest.raises(ValueError, match=r"next_sentence_label must be .* shape \(B, S\) of cls_positions, \(2, 2\)"):
        model(ids, cls_positions=torch.zeros(2, 2, dtype=torch.long), next_sentence_label=torch.zeros(2).long())
    with pytest.raises(ValueError, match=r"document_ids must have the shape of input_ids"):
        model(ids, document_ids=torch.zeros(2, 9, dtype=torch.long))


@pytest.mark.parametrize("settings, message", [
    (dict(model="gpt", pack=True), "pack applies to --model bert only"),
    (dict(model="bert", doc_mask=True), "doc_mask applies to --model gpt only"),
    (dict(model="bert", reset_positions=True), "reset_positions applies to --model gpt only"),
    (dict(model="gpt", reset_positions=True), "reset_positions needs doc_mask=true"),
])
def test_options_that_do_not_apply_are_named(settings, message):
    with pytest.raises(ConfigError, match=message):
        TrainConfig(**settings)


def test_a_block_too_small_for_one_pair_and_a_tokenizer_without_a_separator_are_named():
    with pytest.raises(ConfigError, match="block_size=4 holds no .CLS. A .SEP. B .SEP. pair, which needs at least 5"):
        resolve_config(["--model=bert", "--pack=true", "--block_size=4"])
    with pytest.raises(ConfigError, match="doc_mask needs <.endoftext.> in the tokenizer"):
        P.model_config(TrainConfig(doc_mask=True), vocab_size=64, pad_id=0, eot_id=None)
    config = P.model_config(TrainConfig(doc_mask=True, reset_positions=True), vocab_size=64, pad_id=0, eot_id=7)
    assert (config.doc_sep_id, config.reset_positions) == (7, True)
    assert P.model_config(TrainConfig(), vocab_size=64, pad_id=0, eot_id=7).doc_sep_id is None


def test_doc_mask_on_token_files_without_a_tokenizer_is_refused(tmp_path, capsys):
    np.arange(4000, dtype=np.uint16).__mod__(50).tofile(tmp_path / "train.bin")
    args = [f"--data={tmp_path / 'train.bin'}", "--vocab_size=50", "--doc_mask=true", f"--out_dir={tmp_path / 'run'}",
            f"--cache_dir={tmp_path / 'cache'}", "--max_iters=1", "--progress=false"]
    assert T.main(args) == 2
    assert "doc_mask needs <|endoftext|> in the tokenizer" in capsys.readouterr().err


def test_gpt_with_doc_mask_exports_to_hugging_face():
    transformers = pytest.importorskip("transformers")
    from minipt import hf

    model = GPT(GPTConfig(**GPT_TINY, doc_sep_id=SEP, reset_positions=True, backend="torch")).eval()
    exported = hf.to_hf(model).eval()
    assert isinstance(exported, transformers.GPT2LMHeadModel)
    ids = torch.tensor([[SEP, 5, 6, 7, 8, 9]])  # one document: the mask and the positions change nothing
    with torch.no_grad():
        torch.testing.assert_close(exported(ids).logits, model(ids).logits, rtol=1e-4, atol=1e-4)


def test_a_doc_mask_run_keeps_its_documents_in_its_saved_model(tmp_path):
    from test_train import tiny_args

    from minipt import checkpoint as ckpt

    out = tmp_path / "run"
    assert T.main(tiny_args(tmp_path, max_iters=2, eval_interval=2, doc_mask="true", reset_positions="true")) == 0
    model, tok, saved = load_run(out)
    assert saved["train"]["doc_mask"] and model.config.doc_sep_id == tok.eot_id is not None
    assert model.config.reset_positions and ckpt.read_config(out)["model"]["doc_sep_id"] == tok.eot_id
    result = EV.evaluate(EvalConfig(out_dir=str(out), data=str(tmp_path / "corpus")), setup("cpu", "float32"))
    assert np.isfinite(result["loss"]) and result["tokens"] > 0
    # a run started from it keeps documents apart only if it asks to
    again = tmp_path / "again"
    assert T.main([f"--init_from={out}", f"--data={tmp_path / 'corpus'}", f"--cache_dir={tmp_path / 'cache'}",
                   f"--out_dir={again}", "--block_size=16", "--max_iters=1", "--eval_iters=1", "--progress=false",
                   "--sample_tokens=0"]) == 0
    assert ckpt.read_config(again)["model"]["doc_sep_id"] is None
    with pytest.raises(ConfigError, match="pack applies to --model bert only"):  # the checkpoint's kind decides
        resolve_config([f"--init_from={out}", "--pack=true", f"--out_dir={tmp_path / 'third'}"])
