"""What a run tells its user at the end and on the way: the BERT fill-mask demo on a sentence of the run's
own validation text with probabilities that differ, and the note when a tokenizer trains fewer tokens than asked."""

import re

import numpy as np
import pytest
from tokenizers import Tokenizer

from minipt import sample as S
from minipt import train as T
from minipt.data import prepare_data
from minipt.inference import fill_mask, masked_sentence, percent
from minipt.load import load_run
from minipt.tokenizer import TextTokenizer
from test_train import tiny_args

BERT = ["--model=bert", "--tokenizer=wordpiece", "--vocab_size=200", "--block_size=32", "--sample_tokens=0"]
DEMO = re.compile(r"fill-mask, a sentence of the validation text with '(\w+)' masked: (.+)\n  (.+)\n")


def val_segments(tmp_path) -> list[list[int]]:
    """The token ids of every validation segment of the tiny corpus, as the runs here split it."""
    prep = prepare_data(model="bert", data=str(tmp_path / "corpus"), tokenizer="wordpiece", vocab_size=200,
                        cache_dir=tmp_path / "cache", log=lambda msg: None)
    return [s.tolist() for shard in prep.val.shards for document in shard.documents() for s in document]


def test_the_bert_demo_masks_a_word_of_a_validation_sentence_and_shows_distinct_probabilities(tmp_path, capsys):
    assert T.main(tiny_args(tmp_path, max_iters=4, eval_interval=2) + BERT) == 0
    out = capsys.readouterr().out
    word, text, shown = DEMO.search(out).groups()
    assert "to be, or not to be" not in out
    tok = TextTokenizer.from_file(tmp_path / "run" / "tokenizer.json", "bert")
    assert text.count("[MASK]") == 1
    assert tok.encode(text.replace("[MASK]", word)) in val_segments(tmp_path)  # the run's own validation text

    model, tok, _ = load_run(tmp_path / "run")
    (candidates,) = fill_mask(model, tok, text, top_k=5)
    assert shown == ", ".join(f"{token} {percent(p)}" for token, p in candidates)
    assert len({percent(p) for _, p in candidates}) > 1

    # the same seed draws the same sentence: a second run (reusing the cache) prints the same demo
    assert T.main(tiny_args(tmp_path, out="again", max_iters=4, eval_interval=2) + BERT) == 0
    assert DEMO.search(capsys.readouterr().out).group(2) == text


def test_the_demo_sentence_is_a_whole_word_drawn_by_the_seed(tmp_path):
    tok = TextTokenizer.wrap(Tokenizer.from_str(_tiny_wordpiece()), "bert")
    segments = [np.asarray(tok.encode(t)) for t in (
        "the quick brown fox jumps over the lazy dog near the river bank",
        "all the world is a stage and all the men and women merely players",
        "short one",  # too short to be a sentence the demo draws
        "now is the winter of our discontent made glorious summer by this sun of york",
    )]
    drawn = {masked_sentence(tok, segments, seed) for seed in range(30)}
    assert len({text.replace("[MASK]", word) for text, word in drawn}) == 3 and len(drawn) > 6  # not "short one"
    for text, word in drawn:
        restored = tok.encode(text.replace("[MASK]", word))
        assert any(restored == s.tolist() for s in segments) and word.isalpha() and "##" not in word
        assert masked_sentence(tok, segments, 7) == masked_sentence(tok, segments, 7)
    assert masked_sentence(tok, segments[2:3], 0) is None


def _tiny_wordpiece() -> str:
    from minipt.tokenizer import train_tokenizer

    words = ("the quick brown fox jumps over lazy dog near river bank all world is a stage and men women merely "
             "players short one now winter of our discontent made glorious summer by this sun york")
    return train_tokenizer("wordpiece", [words] * 3, 400, "bert").to_str()


@pytest.mark.parametrize("p, shown", [(0.5, "50%"), (0.123456, "12.3%"), (0.000123, "0.0123%"), (0.0004, "0.04%"),
                                      (0.00041, "0.041%")])
def test_probabilities_are_percentages_of_three_significant_digits(p, shown):
    assert percent(p) == shown  # 0.0004 and 0.00041 both printed "0.000" before


def test_sample_prints_bert_probabilities_as_percentages(tmp_path, capsys):
    assert T.main(tiny_args(tmp_path, max_iters=2, eval_interval=2) + BERT) == 0
    capsys.readouterr()
    text = "shall i compare thee to a [MASK] day?"
    assert S.main([f"--out_dir={tmp_path / 'run'}", f"--text={text}", "--text_a=shall i compare thee",
                   "--text_b=to a summer's day?"]) == 0
    out = capsys.readouterr().out
    model, tok, _ = load_run(tmp_path / "run")
    (candidates,) = fill_mask(model, tok, text, top_k=5)
    assert "  [MASK] 1: " + ", ".join(f"{token} {percent(p)}" for token, p in candidates) + "\n" in out
    assert re.search(r"P\(B follows A\) = \d+(\.\d+)?%", out)


# ----------------------------------------------------------------------------- the tokenizer's size
@pytest.mark.parametrize("model, kind", [("gpt", "bpe"), ("bert", "wordpiece")])
def test_a_tokenizer_smaller_than_asked_is_noted_with_both_sizes(tmp_path, capsys, model, kind):
    args = tiny_args(tmp_path, max_iters=1, eval_interval=1, model=model, tokenizer=kind, block_size=32,
                     sample_tokens=0)
    assert T.main(args + ["--vocab_size=8192"]) == 0
    out = capsys.readouterr().out
    trained = TextTokenizer.from_file(tmp_path / "run" / "tokenizer.json", model).vocab_size
    assert trained < 8192
    assert (f"data: note: the {kind} tokenizer has {trained:,} tokens, fewer than the vocab_size 8,192 asked for: "
            "its training text ran out of merges") in out
    assert f"vocab {trained}, " in out
    assert T.main(args + [f"--vocab_size={trained - 20}", "--overwrite"]) == 0  # a size the corpus reaches
    assert "ran out of merges" not in capsys.readouterr().out
