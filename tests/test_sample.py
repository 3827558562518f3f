"""Sampling from saved runs: GPT continuations, BERT fill-mask and next sentence prediction."""

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from minipt import sample as S
from minipt import train as T
from minipt.inference import fill_mask, generate_text, next_sentence_probability
from minipt.load import load_run

from hf_folders import bert_folder, gpt2_folder, hf_tokenizer, transformers

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
    model, tok, config = load_run(runs["gpt"])
    assert not model.training and config["model_type"] == "gpt"
    again, _, _ = load_run(runs["gpt"])
    for p, q in zip(model.parameters(), again.parameters()):
        assert torch.equal(p, q)
    assert model.transformer.wte.weight.data_ptr() != again.transformer.wte.weight.data_ptr()


def test_generate_continues_the_prompt_reproducibly(runs):
    model, tok, _ = load_run(runs["gpt"])
    a = generate_text(model, tok, "The cat", max_new_tokens=12, seed=3)
    assert a.startswith("The cat") and a == generate_text(model, tok, "The cat", max_new_tokens=12, seed=3)
    many = generate_text(model, tok, "", max_new_tokens=5, seed=4, num_samples=3)
    assert len(many) == 3 and all(isinstance(t, str) for t in many)


def test_greedy_generation_follows_the_argmax(runs):
    model, tok, _ = load_run(runs["gpt"])
    text = generate_text(model, tok, "The", max_new_tokens=4, temperature=0.0)
    ids = [tok.eot_id, *tok.encode("The")]
    for _ in range(4):
        logits = model(torch.tensor([ids])).logits[0, -1]
        ids.append(int(logits.argmax()))
    assert text == "The" + tok.decode(ids[1 + len(tok.encode("The")):])


def test_fill_mask_ranks_the_mlm_probabilities(runs):
    model, tok, _ = load_run(runs["bert"])
    text = "The cat sits on the [MASK]. The [MASK] lies on the rug."
    result = fill_mask(model, tok, text, top_k=4)
    assert len(result) == 2 and all(len(c) == 4 for c in result)
    ids = [tok.cls_id, *tok.encode(text), tok.sep_id]
    logits = model(torch.tensor([ids]), return_logits=True).logits[0]
    for candidates, pos in zip(result, [i for i, t in enumerate(ids) if t == tok.mask_id]):
        probs = F.softmax(logits[pos, : tok.vocab_size], -1)
        best = probs.topk(4)
        assert [c[0] for c in candidates] == [tok.id_to_token(i) for i in best.indices.tolist()]
        assert [c[1] for c in candidates] == pytest.approx(best.values.tolist(), rel=1e-5)
    with pytest.raises(ValueError, match="holds no \\[MASK\\]"):
        fill_mask(model, tok, "nothing to fill")


def test_next_sentence_probability_is_the_nsp_softmax(runs):
    model, tok, _ = load_run(runs["bert"])
    p = next_sentence_probability(model, tok, "I like cats.", "They are cute.")
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
        (["--out_dir=nowhere"], "nowhere is not a folder: expected a minipt run or a Hugging Face model folder"),
        (["--temperature=-1"], "temperature must be >= 0"),
        (["--text_a=only a"], "needs both --text_a and --text_b"),
        (["--text_b=only b"], "--text_b needs --text_a (next sentence prediction) or --text (a fine-tune run's pair)"),
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
    assert S.main([f"--out_dir={runs['bert']}", "--text=The [MASK] sat.", "--text_b=A pair."]) == 2
    assert "--text_b without --text_a applies to a fine-tune run only" in capsys.readouterr().err


# ----------------------------------------------------------------------------- Hugging Face folders
@pytest.fixture(scope="module")
def hf_folders(tmp_path_factory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("hf")
    return {"bert": bert_folder(tmp / "bert"), "gpt2": gpt2_folder(tmp / "gpt2", weights="bin")}


def test_fill_mask_matches_transformers_on_a_saved_bert(hf_folders):
    folder = hf_folders["bert"]
    model, tok, _ = load_run(folder)
    theirs_tok, theirs = hf_tokenizer(folder), transformers.BertForPreTraining.from_pretrained(folder).eval()
    text = "The cat sits on the [MASK]."
    batch = theirs_tok(text, return_tensors="pt")
    assert batch["input_ids"][0].tolist() == [tok.cls_id, *tok.encode(text), tok.sep_id]
    assert tok.vocab_size < model.config.vocab_size  # the embedding's spare rows are no candidates
    with torch.no_grad():
        logits = theirs(**batch).prediction_logits[0].double()
    position = batch["input_ids"][0].tolist().index(tok.mask_id)
    expected = logits[position, : tok.vocab_size].softmax(-1).topk(5)
    (candidates,) = fill_mask(model, tok, text, top_k=5)
    assert [t for t, _ in candidates] == theirs_tok.convert_ids_to_tokens(expected.indices.tolist())
    assert [p for _, p in candidates] == pytest.approx(expected.values.tolist(), abs=1e-4)
    assert expected.values[0] > 2 * expected.values[-1]  # a sharp ranking, not a tie broken by rounding


def test_next_sentence_probability_matches_transformers_on_a_saved_bert(hf_folders):
    folder = hf_folders["bert"]
    model, tok, _ = load_run(folder)
    theirs_tok, theirs = hf_tokenizer(folder), transformers.BertForPreTraining.from_pretrained(folder).eval()
    batch = theirs_tok("I like cats.", "They are cute.", return_tensors="pt")
    with torch.no_grad():
        expected = theirs(**batch).seq_relationship_logits[0].double().softmax(-1)[0].item()
    p = next_sentence_probability(model, tok, "I like cats.", "They are cute.")
    assert p == pytest.approx(expected, abs=1e-4)


def test_greedy_generation_matches_transformers_on_a_saved_gpt2(hf_folders):
    folder = hf_folders["gpt2"]
    model, tok, _ = load_run(folder)
    theirs_tok, theirs = hf_tokenizer(folder), transformers.GPT2LMHeadModel.from_pretrained(folder).eval()
    prompt = "The cat sits on the"
    ids = [tok.eot_id, *theirs_tok(prompt)["input_ids"]]
    assert ids[1:] == tok.encode(prompt)
    expected = theirs.generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False, pad_token_id=tok.eot_id)
    text = generate_text(model, tok, prompt, max_new_tokens=12, temperature=0.0)
    assert text == prompt + theirs_tok.decode(expected[0, len(ids):])
    produced = tok.encode(text)[len(ids) - 1:]
    assert len(set(produced)) > 2  # the continuation is not one token repeated


def test_sample_command_reads_hf_folders(hf_folders, capsys):
    assert S.main([f"--out_dir={hf_folders['gpt2']}", "--prompt=The cat sits on the", "--temperature=0",
                   "--max_new_tokens=4"]) == 0
    assert capsys.readouterr().out.startswith("The cat sits on the")
    assert S.main([f"--out_dir={hf_folders['bert']}", "--text=The cat sits on the [MASK].",
                   "--text_a=I like cats.", "--text_b=They are cute."]) == 0
    out = capsys.readouterr().out
    assert "[MASK] 1: " in out and "P(B follows A) = " in out


def test_a_masked_lm_folder_with_a_tokenizer_json(tmp_path, capsys):
    folder = bert_folder(tmp_path / "mlm", architecture="BertForMaskedLM")
    hf_tokenizer(folder).save_pretrained(folder)  # tokenizer.json, which is read before vocab.txt
    (folder / "vocab.txt").unlink()
    model, tok, config = load_run(folder)
    assert "no pooler or NSP head" in config["notes"][0]
    theirs = transformers.BertForMaskedLM.from_pretrained(folder).eval()
    text = "I like [MASK]."
    batch = hf_tokenizer(folder)(text, return_tensors="pt")
    assert batch["input_ids"][0].tolist() == [tok.cls_id, *tok.encode(text), tok.sep_id]
    position = batch["input_ids"][0].tolist().index(tok.mask_id)
    with torch.no_grad():
        probs = theirs(**batch).logits[0, position, : tok.vocab_size].softmax(-1)
    (candidates,) = fill_mask(model, tok, text, top_k=3)
    assert [p for _, p in candidates] == pytest.approx(probs.topk(3).values.tolist(), abs=1e-4)
    # its NSP head starts fresh: a probability from it is no result
    assert config["untrained_heads"] == ["nsp"]
    assert S.main([f"--out_dir={folder}", "--text_a=I like cats.", "--text_b=They are cute."]) == 2
    out, err = capsys.readouterr()
    assert "note: the BertForMaskedLM in " in err and "the NSP head of" in err and "is untrained" in err
    assert "P(B follows A)" not in out
    assert S.main([f"--out_dir={folder}", "--text=I like [MASK]."]) == 0


@pytest.mark.parametrize("kind, argv, message", [
    ("gpt", ["--text=The cat sits on the [MASK]."], "holds a GPT: it continues --prompt; --text"),
    ("gpt", ["--prompt=The", "--text_a=I like cats.", "--text_b=They are cute."], "holds a GPT"),
    ("bert", ["--prompt=The cat"], "holds a BERT, which fills [MASK]s instead of continuing a prompt"),
    ("bert", ["--text=no mask here", "--text_a=I like cats.", "--text_b=They are cute."],
     "the text holds no [MASK] token to fill"),
])
def test_an_argument_for_another_kind_of_model_is_named_before_any_output(runs, capsys, kind, argv, message):
    assert S.main([f"--out_dir={runs[kind]}", *argv]) == 2
    out, err = capsys.readouterr()
    assert message in err and "Traceback" not in err
    assert out == ""  # nothing printed before the error
