"""Sampling from saved runs: GPT continuations, BERT fill-mask and next sentence prediction."""

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from minipt import sample as S
from minipt import train as T

LINES = [
    "The cat sits on the mat. The dog lies on the rug.",
    "I like cats. They are cute. The sky is blue.",
    "Good morrow, my lord. How fares your grace this day?",
]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """A GPT and a BERT run, a few steps each: enough to load, not to be good."""
    tmp = tmp_path_factory.mktemp("runs")
    corpus = tmp / "corpus"
    corpus.mkdir()
    for d in range(3):
        text = "\n\n".join(LINES[(d + i) % 3] for i in range(6))
        (corpus / f"doc{d}.txt").write_text(text + "\n", encoding="utf-8")
    common = [f"--data={corpus}", f"--cache_dir={tmp / 'cache'}", "--n_layer=1", "--n_head=2", "--n_embd=32",
              "--batch_size=4", "--max_iters=3", "--eval_interval=3", "--eval_iters=1", "--progress=false",
              "--sample_tokens=0"]
    out = {"gpt": tmp / "gpt", "bert": tmp / "bert"}
    assert T.main(common + [f"--out_dir={out['gpt']}", "--tokenizer=bpe", "--vocab_size=300", "--block_size=16"]) == 0
    assert T.main(common + [f"--out_dir={out['bert']}", "--model=bert", "--vocab_size=200", "--block_size=48"]) == 0
    return out


def test_load_run_restores_the_saved_weights(runs):
    model, tok, config = S.load_run(runs["gpt"])
    assert not model.training and config["model_type"] == "gpt"
    again, _, _ = S.load_run(runs["gpt"])
    for p, q in zip(model.parameters(), again.parameters()):
        assert torch.equal(p, q)
    assert model.transformer.wte.weight.data_ptr() != again.transformer.wte.weight.data_ptr()


def test_generate_continues_the_prompt_reproducibly(runs):
    model, tok, _ = S.load_run(runs["gpt"])
    a = S.generate_text(model, tok, "The cat", max_new_tokens=12, seed=3)
    assert a.startswith("The cat") and a == S.generate_text(model, tok, "The cat", max_new_tokens=12, seed=3)
    many = S.generate_text(model, tok, "", max_new_tokens=5, seed=4, num_samples=3)
    assert len(many) == 3 and all(isinstance(t, str) for t in many)


def test_greedy_generation_follows_the_argmax(runs):
    model, tok, _ = S.load_run(runs["gpt"])
    text = S.generate_text(model, tok, "The", max_new_tokens=4, temperature=0.0)
    ids = [tok.eot_id, *tok.encode("The")]
    for _ in range(4):
        logits = model(torch.tensor([ids])).logits[0, -1]
        ids.append(int(logits.argmax()))
    assert text == "The" + tok.decode(ids[1 + len(tok.encode("The")):])


def test_fill_mask_ranks_the_mlm_probabilities(runs):
    model, tok, _ = S.load_run(runs["bert"])
    text = "The cat sits on the [MASK]. The [MASK] lies on the rug."
    result = S.fill_mask(model, tok, text, top_k=4)
    assert len(result) == 2 and all(len(c) == 4 for c in result)
    ids = [tok.cls_id, *tok.encode(text), tok.sep_id]
    logits = model(torch.tensor([ids]), return_logits=True).logits[0]
    for candidates, pos in zip(result, [i for i, t in enumerate(ids) if t == tok.mask_id]):
        probs = F.softmax(logits[pos, : tok.vocab_size], -1)
        best = probs.topk(4)
        assert [c[0] for c in candidates] == [tok.id_to_token(i) for i in best.indices.tolist()]
        assert [c[1] for c in candidates] == pytest.approx(best.values.tolist(), rel=1e-5)
    with pytest.raises(ValueError, match="holds no \\[MASK\\]"):
        S.fill_mask(model, tok, "nothing to fill")


def test_next_sentence_probability_is_the_nsp_softmax(runs):
    model, tok, _ = S.load_run(runs["bert"])
    p = S.next_sentence_probability(model, tok, "I like cats.", "They are cute.")
    a, b = tok.encode("I like cats."), tok.encode("They are cute.")
    ids = [tok.cls_id, *a, tok.sep_id, *b, tok.sep_id]
    types = [0] * (len(a) + 2) + [1] * (len(b) + 1)
    logits = model(torch.tensor([ids]), token_type_ids=torch.tensor([types])).nsp_logits[0]
    assert p == pytest.approx(F.softmax(logits, -1)[0].item(), rel=1e-5) and 0 < p < 1


def test_sample_command_for_both_models(runs, capsys):
    assert S.main([f"--out_dir={runs['gpt']}", "--prompt=The sky", "--max_new_tokens=5", "--num_samples=2"]) == 0
    assert capsys.readouterr().out.count("The sky") == 2
    assert S.main([f"--out_dir={runs['bert']}", "--text=The cat sits on the [MASK].", "--candidates=3",
                   "--text_a=I like cats.", "--text_b=The sky is blue."]) == 0
    out = capsys.readouterr().out
    assert "[MASK] 1: " in out and out.count(",") >= 2 and "P(B follows A) = " in out


@pytest.mark.parametrize(
    "argv, pattern",
    [
        (["--out_dir=nowhere"], "no run in nowhere: config.json is missing"),
        (["--temperature=-1"], "temperature must be >= 0"),
        (["--text_a=only a"], "needs both --text_a and --text_b"),
        (["--top_k=0"], "top_k must be a positive integer or none"),
        (["--promt=x"], "did you mean --prompt"),
    ],
)
def test_sample_errors_are_named(argv, pattern, capsys):
    assert S.main(argv) == 2
    err = capsys.readouterr().err
    assert pattern in err and "Traceback" not in err


def test_bert_needs_text_and_fitting_inputs(runs, capsys):
    assert S.main([f"--out_dir={runs['bert']}"]) == 2
    assert "needs --text with [MASK] tokens" in capsys.readouterr().err
    assert S.main([f"--out_dir={runs['bert']}", "--text=" + "word " * 60 + "[MASK]"]) == 2
    assert "more than the model's block_size 48" in capsys.readouterr().err
