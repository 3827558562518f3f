"""Corpus loading, markup stripping, splits, tokenizers, the cache, GPT windows and BERT pairs.

Input formats, shards, resuming and bad input are in test_data_formats.py."""

import json
import random

import numpy as np
import pytest
import torch

from minipt import data as D
from minipt.data import prepare as P
from minipt.data import samplers
from minipt.data import sources as S
from minipt.tokenizer import BERT_SPECIALS, EOT, UNK, TextTokenizer, TokenizerError, train_tokenizer

PLAY = """# The Tragedy of Testing

## ACT I

### SCENE I. A room.

_Enter ALPHA and BETA, with
attendants_

**ALPHA**  
Good morrow, friend\\--how fares the day?  
__\\[Aside]_ And yet I doubt it.

**BETA**  
[To ALPHA]_  
Well enough.  
*[Reads.]*  

_Exeunt_
"""


def quiet(message):
    pass


def write_docs(folder, texts):
    folder.mkdir(parents=True, exist_ok=True)
    for i, text in enumerate(texts):
        (folder / f"doc{i:02d}.txt").write_text(text, encoding="utf-8")
    return folder


def prose(seed: int, paragraphs: int = 6) -> str:
    """Sentences of words drawn from a small vocabulary, blank lines between paragraphs."""
    rng = random.Random(seed)
    words = "the king queen fool sword crown night day love war peace heart hand eye".split()
    paras = []
    for _ in range(paragraphs):
        sents = [" ".join(rng.choices(words, k=rng.randint(3, 9))).capitalize() + rng.choice(".!?") for _ in range(4)]
        paras.append("\n".join(sents))
    return "\n\n".join(paras) + "\n"


# ----------------------------------------------------------------------------- corpus
def test_strip_play_markup_keeps_speeches_and_drops_layout():
    assert D.strip_play_markup(PLAY) == (
        "ALPHA:\nGood morrow, friend--how fares the day?\nAnd yet I doubt it.\n\nBETA:\nWell enough.\n"
    )


def documents(data: str, **kw) -> list[tuple[str, str]]:
    """(name, text) of every document ``data`` names."""
    return [(name, text) for s in D.find_sources(data) for _, name, text in D.read_documents(s, **kw)]


def test_bundled_plays_are_plain_text_unless_asked():
    docs = documents("")
    assert len(docs) == 38 and all(name.endswith(".md") for name, _ in docs)
    text = "".join(t for _, t in docs)
    assert 4_000_000 < len(text) < 5_318_858  # markup gone, the verse kept
    for marker in ("**", "\n#", "_Enter", "\\"):
        assert marker not in text
    assert "ROMEO:\n" in text and "HAMLET:\n" in text
    raw = documents("", strip_markup=False)
    assert "**HAMLET**" in "".join(t for _, t in raw)


def test_load_txt_folder_and_jsonl(tmp_path):
    folder = write_docs(tmp_path / "docs", ["first doc\n", "second doc\n", "   \n"])
    (folder / "ignored.csv").write_text("not text")
    (folder / "sub").mkdir()
    (folder / "sub" / "notes.md").write_text("# notes\n")
    assert documents(str(folder)) == [  # sorted and recursive; blank documents are dropped when tokenizing
        ("doc00.txt", "first doc\n"), ("doc01.txt", "second doc\n"), ("doc02.txt", "   \n"),
        ("sub/notes.md", "# notes\n"),
    ]
    assert documents(str(folder / "doc01.txt")) == [("doc01.txt", "second doc\n")]
    assert [n for n, _ in documents(str(folder / "**" / "*.md"))] == ["sub/notes.md"]
    jsonl = tmp_path / "c.jsonl"
    jsonl.write_text(json.dumps({"text": "a b c"}) + "\n\n" + json.dumps({"text": "d e", "id": 3}) + "\n")
    assert documents(str(jsonl)) == [("c.jsonl:1", "a b c"), ("c.jsonl:3", "d e")]


@pytest.mark.parametrize(
    "setup, pattern",
    [
        (lambda p: p / "missing.txt", "does not exist"),
        (lambda p: (p / "x.pdf").write_bytes(b"%PDF\0") and p / "x.pdf", r"x\.pdf: not a text file \(a NUL byte"),
        (lambda p: (p / "empty").mkdir() or p / "empty", r"holds no file of a known format \(\.bin, \.jsonl"),
        (lambda p: (p / "b.jsonl").write_text('{"text": "ok"}\n{broken\n') and p / "b.jsonl", "b.jsonl:2: not valid"),
    ],
)
def test_bad_corpora_are_named(tmp_path, setup, pattern):
    with pytest.raises(D.DataError, match=pattern):
        documents(str(setup(tmp_path)))


def split_pieces(folder, mode, val_fraction):
    sources = D.find_sources(str(folder))
    return [pieces for _, pieces in P._documents(sources, mode, val_fraction, "text", True)]


def test_stream_split_is_nanogpts_character_split(tmp_path):
    texts = [prose(i) for i in range(5)]
    full = "".join(texts)
    pieces = split_pieces(write_docs(tmp_path / "c", texts), "stream", 0.1)
    cut = int(len(full) * 0.9)
    assert "".join(t for doc in pieces for split, t in doc if split == "train") == full[:cut]
    assert "".join(t for doc in pieces for split, t in doc if split == "val") == full[cut:]
    assert [[split for split, _ in doc] for doc in pieces] == [["train"]] * 4 + [["train", "val"]]


def test_doc_split_holds_out_the_tail_of_every_document_at_a_line_start(tmp_path):
    texts = [prose(i, paragraphs=12) for i in range(4)]
    for text, doc in zip(texts, split_pieces(write_docs(tmp_path / "c", texts), "doc", 0.2)):
        (s1, t), (s2, v) = doc
        assert (s1, s2) == ("train", "val") and t + v == text and t.endswith("\n")
        assert 0.2 <= len(v) / len(text) < 0.25


def test_holdout_split_holds_out_whole_documents_by_name(tmp_path):
    texts = [f"document {i}\n" for i in range(400)]
    pieces = split_pieces(write_docs(tmp_path / "c", texts), "holdout", 0.25)
    assert all(len(doc) == 1 for doc in pieces)  # never a document cut in two
    val = [t for doc in pieces for split, t in doc if split == "val"]
    assert 0.18 < len(val) / len(texts) < 0.32
    assert sorted(val) == sorted(t for i, t in enumerate(texts) if S.held_out(f"doc{i:02d}.txt", 0.25))


def test_segments_are_paragraphs_and_long_ones_are_split_into_sentences():
    text = "ROMEO:\nIs the day so young? But new struck\nnine.\n\nBENVOLIO:\nAy!  Good  morrow.\n"
    assert D.segments(text) == ["ROMEO: Is the day so young? But new struck nine.", "BENVOLIO: Ay! Good morrow."]
    long = "KING:\n" + " ".join(f"Sentence number {i} is here." for i in range(30))
    pieces = D.segments(long)
    assert len(long) > S.LONG_PARAGRAPH and len(pieces) == 30
    assert pieces[0] == "KING: Sentence number 0 is here." and pieces[-1] == "Sentence number 29 is here."


# ----------------------------------------------------------------------------- tokenizers
def test_bpe_round_trips_any_text_and_has_the_document_separator():
    text = "Wherefore art thou — Ω, 日本 — café?\n\tend"
    tok = TextTokenizer.wrap(train_tokenizer("bpe", [prose(0), prose(1)], 300, "gpt"), "gpt")
    assert tok.decode(tok.encode(text)) == text
    assert tok.eot_id == tok.tokenizer.token_to_id(EOT) and tok.mask_id is None
    assert tok.decode(tok.encode(prose(0))) == prose(0)


def test_char_tokenizer_is_one_token_per_character():
    tok = TextTokenizer.wrap(train_tokenizer("char", ["hello\nworld"], 8192, "gpt"), "gpt")
    assert tok.vocab_size == 2 + len(set("hello\nworld"))  # <|endoftext|>, [UNK] and the characters
    ids = tok.encode("low\nhold")
    assert len(ids) == 8 and tok.decode(ids) == "low\nhold"
    assert tok.encode("z") == [tok.tokenizer.token_to_id(UNK)]


def test_wordpiece_is_lowercased_with_berts_special_tokens():
    tok = TextTokenizer.wrap(train_tokenizer("wordpiece", [prose(0), prose(1)], 200, "bert"), "bert")
    assert [tok.tokenizer.token_to_id(s) for s in BERT_SPECIALS] == [0, 1, 2, 3, 4]
    assert tok.encode("The KING") == tok.encode("the king")
    assert tok.decode(tok.encode("The king!")) == "the king!"
    assert tok.encode("the [MASK] king")[1] == tok.mask_id


def test_a_tokenizer_without_berts_special_tokens_is_refused(tmp_path):
    path = tmp_path / "tokenizer.json"
    train_tokenizer("bpe", [prose(0)], 300, "gpt").save(str(path))
    with pytest.raises(TokenizerError, match=r"lacks the special tokens BERT needs: \[PAD\] \[CLS\] \[SEP\] \[MASK\]"):
        TextTokenizer.from_file(path, "bert")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(TokenizerError, match="cannot read tokenizer file"):
        TextTokenizer.from_file(tmp_path / "bad.json", "gpt")


# ----------------------------------------------------------------------------- prepared data and the cache
def test_tokenizers_never_see_validation_text(tmp_path):
    docs = [prose(i) for i in range(3)]
    docs[1] += "\n\nzanzibarquux §\n"  # the tail of this document is validation text
    corpus = write_docs(tmp_path / "corpus", docs)
    for model, kind in (("gpt", "char"), ("bert", "wordpiece")):
        prep = D.prepare_data(model=model, data=str(corpus), tokenizer=kind, vocab_size=300, cache_dir=tmp_path / "c",
                              log=quiet)
        vocab = prep.tokenizer.tokenizer.get_vocab()
        assert "§" not in vocab and "zanzibarquux" not in vocab and not any("zanzib" in v for v in vocab)


def test_gpt_stream_is_each_document_then_the_separator(tmp_path):
    texts = [prose(i) for i in range(3)]
    corpus = write_docs(tmp_path / "corpus", texts)
    prep = D.prepare_data(model="gpt", data=str(corpus), tokenizer="bpe", vocab_size=300, cache_dir=tmp_path / "c",
                          log=quiet)
    train, eot = prep.train.shards[0].tokens, prep.tokenizer.eot_id
    assert train.dtype == np.uint16
    ends = np.flatnonzero(train == eot)
    assert len(ends) == 3 and ends[-1] == len(train) - 1
    pieces = np.split(np.asarray(train), ends + 1)[:3]
    assert [prep.tokenizer.decode(p[:-1].tolist()) for p in pieces] == [S.split_tail(t, 0.1)[0] for t in texts]
    np.testing.assert_array_equal(prep.train.shards[0].document_offsets, np.r_[0, ends + 1])


def test_cache_is_reused_and_keyed_on_corpus_and_settings(tmp_path, monkeypatch):
    corpus = write_docs(tmp_path / "corpus", [prose(0), prose(1)])
    kwargs = dict(model="gpt", data=str(corpus), tokenizer="bpe", vocab_size=300, cache_dir=tmp_path / "c", log=quiet)
    first = D.prepare_data(**kwargs)

    def no_training(*args, **kw):
        raise AssertionError("the cache should have been used")

    monkeypatch.setattr(P, "train_tokenizer", no_training)
    again = D.prepare_data(**kwargs)
    assert again.cache_path == first.cache_path
    np.testing.assert_array_equal(again.train.shards[0].tokens, first.train.shards[0].tokens)
    monkeypatch.undo()
    assert D.prepare_data(**{**kwargs, "vocab_size": 280}).cache_path != first.cache_path
    (corpus / "doc01.txt").write_text(prose(1) + "more\n")
    latest = D.prepare_data(**kwargs)
    assert latest.cache_path != first.cache_path
    folders = [p for p in (tmp_path / "c").iterdir() if not p.is_symlink()]
    assert len(folders) == 3 and all(p.name.isalnum() for p in folders)  # no temporary directory left behind

    # A resumed run passes the tokenizer it saved: the cache that trained it answers, no tokenizing again.
    monkeypatch.setattr(P, "_tokenize", no_training)
    resumed = D.prepare_data(**{**kwargs, "tokenizer": str(latest.cache_path / "tokenizer.json")})
    assert resumed.cache_path.resolve() == latest.cache_path


def test_a_cache_of_another_layout_version_is_never_read(tmp_path, monkeypatch):
    corpus = write_docs(tmp_path / "corpus", [prose(0), prose(1)])
    kwargs = dict(model="bert", data=str(corpus), tokenizer="wordpiece", vocab_size=300, cache_dir=tmp_path / "c",
                  log=quiet)
    current = D.prepare_data(**kwargs)
    assert sorted(p.name for p in current.cache_path.glob("*.npy")) == [
        "train-00000.documents.npy", "train-00000.segments.npy", "val-00000.documents.npy", "val-00000.segments.npy"
    ]
    monkeypatch.setattr(P, "CACHE_VERSION", P.CACHE_VERSION - 1)
    assert D.prepare_data(**kwargs).cache_path != current.cache_path


def test_large_vocabularies_are_stored_as_uint32(tmp_path):
    class Wide:
        vocab_size, eot_id = 70_000, 69_999

        def encode_batch(self, texts):
            return [[65_536 + i, 3] for i, _ in enumerate(texts)]

    def docs_from(start):
        return iter([((0, 1), [("train", "x")]), ((0, 2), [("train", "y"), ("val", "z")])][start[1]:])

    meta = P._tokenize(tmp_path, Wide(), "gpt", docs_from, 1 << 20, P.Progress(2, quiet))
    assert meta["dtype"] == "uint32" and meta["shards"]["train"] == [{"file": "train-00000.bin", "num_tokens": 6}]
    tokens = np.fromfile(tmp_path / "train-00000.bin", dtype=np.uint32)
    assert tokens.tolist() == [65_536, 3, 69_999, 65_537, 3, 69_999]


def test_given_tokenizer_file_is_used_as_is(tmp_path):
    corpus = write_docs(tmp_path / "corpus", [prose(0), prose(1)])
    path = tmp_path / "tok.json"
    train_tokenizer("char", ["abcdefghijklmnopqrstuvwxyz"], 0, "gpt").save(str(path))
    prep = D.prepare_data(model="gpt", data=str(corpus), tokenizer=str(path), cache_dir=tmp_path / "c", log=quiet)
    assert prep.tokenizer.to_str() == TextTokenizer.from_file(path, "gpt").to_str()


# ----------------------------------------------------------------------------- GPT windows
def stream_split(n=500, vocab=50):
    return D.TokenSplit([D.TokenShard(np.random.default_rng(0).integers(0, vocab, n).astype(np.uint16))])


def test_windows_are_shifted_slices_of_the_stream():
    tokens = stream_split().shards[0].tokens
    sampler = D.WindowSampler(stream_split(), block_size=17, batch_size=5, seed=3)
    batches = sampler.next_step(accumulation=2)
    assert len(batches) == 2
    for b in batches:
        assert b["x"].shape == b["y"].shape == (5, 17) and b["x"].dtype == np.int64
        np.testing.assert_array_equal(b["x"][:, 1:], b["y"][:, :-1])
        for row in b["x"]:
            starts = [o for o in range(len(tokens) - 17) if np.array_equal(tokens[o:o + 17], row)]
            assert starts


def test_window_sampler_state_restores_the_same_batches():
    sampler = D.WindowSampler(stream_split(), block_size=8, batch_size=4, seed=0)
    sampler.next_step(1)
    state = json.loads(json.dumps(sampler.state_dict()))  # plain values: safe to store anywhere
    expected = sampler.next_step(3)
    fresh = D.WindowSampler(stream_split(), block_size=8, batch_size=4, seed=99)
    fresh.load_state_dict(state)
    for a, b in zip(expected, fresh.next_step(3)):
        np.testing.assert_array_equal(a["x"], b["x"])


def test_ranks_read_disjoint_slices_of_the_single_process_batch():
    whole = D.WindowSampler(stream_split(), block_size=8, batch_size=6, seed=5).next_step(2)
    ranks = [
        D.WindowSampler(stream_split(), block_size=8, batch_size=3, seed=5, rank=r, world_size=2).next_step(2)
        for r in (0, 1)
    ]
    # Micro-step m of the global batch: rank 0's rows, then rank 1's.
    for m in range(2):
        np.testing.assert_array_equal(np.concatenate([ranks[0][m]["x"], ranks[1][m]["x"]]), whole[m]["x"][:6])


def test_too_small_splits_are_refused():
    with pytest.raises(D.DataError, match=r"training split holds 8 tokens, no shard of it the block_size \+ 1 = 9"):
        D.WindowSampler(stream_split(8), block_size=8, batch_size=1, seed=0)
    with pytest.raises(D.DataError, match="validation split holds 4 tokens.*raise --val_fraction"):
        D.fixed_windows(stream_split(4), 8, 2, 2, seed=0)


# ----------------------------------------------------------------------------- BERT pairs
def synthetic_documents(n_docs=6, n_segments=30, seed=0):
    """Document d uses only ids in [100 d, 100 d + 100), and its segments count up, so
    both the document a token came from and the order of the tokens can be read off."""
    rng = random.Random(seed)
    docs = []
    for d in range(n_docs):
        start, doc = 100 * d, []
        for _ in range(n_segments):
            n = rng.randint(1, 6)
            doc.append(np.arange(start, start + n) % 100 + 100 * d)
            start += n
        docs.append(doc)
    return docs


def test_pairs_follow_googles_recipe():
    docs = synthetic_documents()
    instances = D.create_pair_instances(docs, max_seq_length=24, short_seq_prob=0.0, rng=random.Random(0))
    assert len(instances) > 40
    random_share = np.mean([x.is_random_next for x in instances])
    assert 0.35 < random_share < 0.7
    for x in instances:
        a, b = x.tokens_a.tolist(), x.tokens_b.tolist()
        assert a and b and len(a) + len(b) <= 24 - 3
        doc_a = {t // 100 for t in a}
        assert len(doc_a) == 1
        if x.is_random_next:
            assert {t // 100 for t in b} != doc_a  # another document (six to choose from)
        elif len(a) + len(b) < 24 - 3:  # untrimmed true continuations run on without a gap
            seq = a + b
            assert all((q - p) % 100 == 1 for p, q in zip(seq, seq[1:]))


def test_short_seq_prob_shortens_the_target_length():
    docs = synthetic_documents(n_segments=200)
    long = D.create_pair_instances(docs, 64, 0.0, random.Random(1))
    short = D.create_pair_instances(docs, 64, 1.0, random.Random(1))
    mean = lambda xs: np.mean([len(x.tokens_a) + len(x.tokens_b) for x in xs])  # noqa: E731
    assert mean(long) > 55 and mean(short) < 0.7 * mean(long)


def test_truncation_trims_the_longer_side_from_its_ends():
    rng = random.Random(0)
    for _ in range(50):
        a, b = list(range(rng.randint(1, 40))), list(range(100, 100 + rng.randint(1, 40)))
        ta, tb = list(a), list(b)
        samplers._truncate_pair(ta, tb, 20, rng)
        assert len(ta) + len(tb) <= 20 and ta and tb
        for orig, cut in ((a, ta), (b, tb)):  # what is left is one contiguous slice
            assert cut == orig[orig.index(cut[0]):orig.index(cut[0]) + len(cut)]


def test_collate_lays_out_cls_a_sep_b_sep_with_padding():
    tok = TextTokenizer.wrap(train_tokenizer("wordpiece", [prose(0)], 200, "bert"), "bert")
    instances = [
        D.PairInstance(np.array([10, 11]), np.array([12]), False),
        D.PairInstance(np.array([20, 21, 22, 23, 24]), np.array([25, 26, 27, 28]), True),
    ]
    batch = D.collate_pairs(instances, tok, max_seq_length=32)
    cls, sep, pad = tok.cls_id, tok.sep_id, tok.pad_id
    assert batch["input_ids"].shape == (2, 16)  # longest is 12 tokens, rounded up to 16
    assert batch["input_ids"][0].tolist() == [cls, 10, 11, sep, 12, sep] + [pad] * 10
    assert batch["token_type_ids"][0].tolist() == [0, 0, 0, 0, 1, 1] + [0] * 10
    assert batch["attention_mask"][1].tolist() == [True] * 12 + [False] * 4
    assert batch["special_tokens_mask"][0].tolist() == [True, False, False, True, False, True] + [True] * 10
    assert batch["next_sentence_label"].tolist() == [0, 1]
    assert D.collate_pairs(instances, tok, max_seq_length=12)["input_ids"].shape == (2, 12)


def bert_split():
    docs = synthetic_documents(n_docs=4, n_segments=20)
    segments = [s for d in docs for s in d]
    seg_off = np.cumsum([0] + [len(s) for s in segments])
    doc_off = np.cumsum([0] + [len(d) for d in docs])
    return D.TokenSplit([D.TokenShard(np.concatenate(segments).astype(np.uint16), doc_off, seg_off)])


def test_token_split_documents_round_trip():
    docs = synthetic_documents(n_docs=4, n_segments=20)
    back = bert_split().shards[0].documents()
    assert [[s.tolist() for s in d] for d in back] == [[s.tolist() for s in d] for d in docs]


def test_pair_sampler_resumes_and_splits_across_ranks():
    tok = TextTokenizer.wrap(train_tokenizer("wordpiece", [prose(0)], 200, "bert"), "bert")
    sampler = D.PairSampler(bert_split(), tok, block_size=24, batch_size=4, short_seq_prob=0.1, seed=2)
    n_epoch = len(sampler._instances)
    for _ in range(n_epoch // 8 + 1):  # past the end of the first epoch
        sampler.next_step(2)
    assert sampler.epoch == 1
    state = sampler.state_dict()
    expected = sampler.next_step(2)
    fresh = D.PairSampler(bert_split(), tok, block_size=24, batch_size=4, short_seq_prob=0.1, seed=2)
    fresh.load_state_dict(state)
    for a, b in zip(expected, fresh.next_step(2)):
        np.testing.assert_array_equal(a["input_ids"], b["input_ids"])

    whole = D.PairSampler(bert_split(), tok, 24, 4, 0.1, seed=7).next_step(1)[0]
    halves = [
        D.PairSampler(bert_split(), tok, 24, 2, 0.1, seed=7, rank=r, world_size=2).next_step(1)[0] for r in (0, 1)
    ]
    assert [halves[0]["next_sentence_label"].tolist() + halves[1]["next_sentence_label"].tolist()] == [
        whole["next_sentence_label"].tolist()
    ]


def test_to_device_keeps_values():
    arrays = {"x": np.arange(6, dtype=np.int64).reshape(2, 3), "m": np.array([True, False])}
    out = D.to_device(arrays, torch.device("cpu"))
    assert out["x"].tolist() == [[0, 1, 2], [3, 4, 5]] and out["m"].dtype == torch.bool


# ----------------------------------------------------------------------------- several shards
def sharded(split: D.TokenSplit, cuts: list[int]) -> D.TokenSplit:
    """``split``'s one shard cut into several at the given document indexes (BERT) or token offsets (GPT)."""
    shard = split.shards[0]
    if shard.segment_offsets is None:
        return D.TokenSplit([D.TokenShard(t) for t in np.split(np.asarray(shard.tokens), cuts)])
    so, do, shards = shard.segment_offsets, shard.document_offsets, []
    for a, b in zip([0, *cuts], [*cuts, len(do) - 1]):
        seg = so[do[a]:do[b] + 1]
        shards.append(D.TokenShard(shard.tokens[seg[0]:seg[-1]], do[a:b + 1] - do[a], seg - seg[0]))
    return D.TokenSplit(shards)


def test_windows_come_from_every_shard_and_never_span_two():
    tokens = np.arange(600, dtype=np.uint16)
    split = sharded(D.TokenSplit([D.TokenShard(tokens)]), [100, 130, 400])  # the 30-token shard is too short
    sampler = D.WindowSampler(split, block_size=31, batch_size=64, seed=0)
    rows = np.concatenate([b["x"] for b in sampler.next_step(8)])
    seen = set()
    for row in rows:
        assert (np.diff(row) == 1).all()  # consecutive ids: one stretch of one shard
        shard = int(np.searchsorted([100, 130, 400], row[0], side="right"))
        assert row[-1] + 1 < [100, 130, 400, 600][shard]  # y's last token is in the same shard too
        seen.add(shard)
    assert seen == {0, 2, 3}
    one = D.WindowSampler(D.TokenSplit([D.TokenShard(tokens)]), block_size=31, batch_size=4, seed=0)
    assert one.starts.tolist() == [0, 600 - 31]  # a single shard reads as the stream it always was


def test_pair_sampler_builds_pairs_within_each_shard_and_resumes_between_them():
    tok = TextTokenizer.wrap(train_tokenizer("wordpiece", [prose(0)], 200, "bert"), "bert")
    split = sharded(bert_split(), [1, 3])  # shards of documents {0}, {1, 2} and {3}
    assert [len(s.documents()) for s in split.shards] == [1, 2, 1]
    sampler = D.PairSampler(split, tok, block_size=24, batch_size=1, short_seq_prob=0.1, seed=2)
    visited = []
    while sampler.epoch == 0:
        (x,) = sampler._take(1)
        docs = {t // 100 for t in [*x.tokens_a.tolist(), *x.tokens_b.tolist()]}  # document d holds ids 100 d + i
        shard = sampler._order(sampler.epoch)[sampler.shard]
        assert docs <= [{0}, {1, 2}, {3}][shard]  # A and B (random B too) from the shard being read
        visited.append(shard)
    assert sorted(set(visited[:-1])) == [0, 1, 2]  # every shard once in an epoch, in the epoch's order
    state = sampler.state_dict()
    expected = sampler.next_step(3)
    fresh = D.PairSampler(split, tok, block_size=24, batch_size=1, short_seq_prob=0.1, seed=2)
    fresh.load_state_dict(state)
    for a, b in zip(expected, fresh.next_step(3)):
        np.testing.assert_array_equal(a["input_ids"], b["input_ids"])
