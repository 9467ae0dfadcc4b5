"""Mixed-modal continuation: always well-formed, consistent with the full forward, written as PNG/WAV."""
import os

import pytest
import torch

import momoe
from momoe.data import load_tokenizer, read_wav, write_wav
from momoe.train import SpanGrammar, continue_document, parse_prompt, save_continuation
from momoe.train.generation import GrammarState, span_lengths, split_spans
from momoe.train.png import read_png, write_png
from tests.train.helpers import tiny_config


@pytest.fixture
def tokenizer(data_root):
    return load_tokenizer(data_root)


def tiny_model(tokenizer, family, seed=0):
    torch.manual_seed(seed)
    return momoe.build_model(tiny_config(family, tokenizer.vocab))


@pytest.mark.parametrize("family", ["transformer", "moma", "mom-mamba"])
def test_sampled_continuations_always_decode(tokenizer, family):
    model = tiny_model(tokenizer, family)
    vocab, image = tokenizer.vocab, tokenizer.tokenizer("image")
    prompt = parse_prompt(["text:a one"], tokenizer)
    for seed in range(4):
        gen = torch.Generator().manual_seed(seed)
        ids = continue_document(model, tokenizer, prompt, max_new_tokens=60, temperature=2.0, generator=gen,
                                max_span=12)
        assert torch.equal(ids[:len(prompt)], prompt) and len(prompt) < len(ids) <= len(prompt) + 60
        spans = split_spans(ids.tolist(), vocab)
        for span in spans:  # every complete span has a valid length and decodes
            if span.modality == "image":
                assert span.stop - span.start == image.codes_per_image
            if span.modality == "speech":
                assert 1 <= span.stop - span.start <= 12
            tokenizer.tokenizer(span.modality).decode(vocab.to_local(span.modality, ids[span.start:span.stop]))
        if ids[-1] == vocab.eos:
            tokenizer.decode(ids)  # a finished document decodes as a whole


@pytest.mark.parametrize("family", ["transformer", "mom-mamba"])
def test_greedy_decoding_matches_the_full_forward(tokenizer, family):
    model = tiny_model(tokenizer, family).eval()
    prompt = parse_prompt(["text:a two"], tokenizer, then="image")
    ids = continue_document(model, tokenizer, prompt, max_new_tokens=8, temperature=0.0)
    grammar = SpanGrammar(tokenizer.vocab, model.config.vocab_size, span_lengths(tokenizer))
    state = grammar.start(prompt.tolist())
    for t in range(len(prompt), len(ids)):
        with torch.no_grad():
            logits = model(ids[None, :t], tokenizer.vocab.modality_of(ids[:t])[None]).logits[0, -1]
        expected = int(logits.masked_fill(~grammar.allowed(state), float("-inf")).argmax())
        assert int(ids[t]) == expected
        state = grammar.advance(state, expected)
    image = tokenizer.vocab.modality("image")
    assert ids[len(prompt) + tokenizer.tokenizer("image").codes_per_image] == image.end  # the image closes


def test_grammar_states_and_errors(tokenizer):
    vocab = tokenizer.vocab
    grammar = SpanGrammar(vocab, vocab.size + 10, {"image": 2}, max_span=3)
    image, speech = vocab.modality("image"), vocab.modality("speech")
    between = grammar.allowed(GrammarState())
    assert between[ord("a")] and between[vocab.eos] and between[image.begin] and between[speech.begin]
    assert not between[image.payload_start] and not between[vocab.bos] and not between[vocab.size:].any()
    state = grammar.start([vocab.bos, image.begin, image.payload_start])
    assert state == GrammarState("image", 1)
    state = grammar.advance(state, image.payload_start + 1)
    assert grammar.allowed(state).nonzero().flatten().tolist() == [image.end]
    state = grammar.start([vocab.bos, speech.begin])
    assert not grammar.allowed(state)[speech.end]  # a speech span has at least one unit
    state = grammar.advance(state, speech.payload_start)
    assert grammar.allowed(state)[speech.end] and grammar.allowed(state)[speech.payload_start]
    with pytest.raises(ValueError, match="cannot follow"):
        grammar.advance(state, ord("a"))
    with pytest.raises(ValueError, match="starts with <bos>"):
        grammar.start([ord("a")])
    with pytest.raises(ValueError, match="already ends"):
        grammar.start([vocab.bos, ord("a"), vocab.eos])


def test_prompts_from_files_and_outputs(tokenizer, tmp_path):
    image = torch.zeros(4, 4)
    image[1] = 1.0
    write_png(str(tmp_path / "in.png"), image, scale=4)  # 16x16: scaled back down to 4x4
    speech = tokenizer.tokenizer("speech")
    write_wav(str(tmp_path / "in.wav"), torch.sin(torch.arange(320) * 0.5), speech.sample_rate)
    prompt = parse_prompt(["text:a one", f"image:{tmp_path / 'in.png'}", f"speech:{tmp_path / 'in.wav'}"], tokenizer,
                          then="image")
    spans = tokenizer.decode(torch.cat([prompt[:-1], torch.tensor([tokenizer.vocab.eos])]))
    assert [m for m, _ in spans] == ["text", "image", "speech"]
    assert torch.equal(tokenizer.tokenizer("image").encode(spans[1][1]), tokenizer.tokenizer("image").encode(image))

    model = tiny_model(tokenizer, "transformer")
    ids = continue_document(model, tokenizer, prompt, max_new_tokens=30, temperature=1.0,
                            generator=torch.Generator().manual_seed(0))
    transcript, files = save_continuation(ids, len(prompt), tokenizer, str(tmp_path / "out"))
    assert transcript.startswith("a one[image][speech]>>> [image: ")
    png = [f for f in files if f.endswith(".png")]
    assert png and read_png(png[0]).shape == (64, 64)
    for wav in (f for f in files if f.endswith(".wav")):
        assert read_wav(wav)[1] == speech.sample_rate
    assert os.path.isfile(tmp_path / "out" / "generated.txt")


def test_bad_prompts(tokenizer, tmp_path):
    with pytest.raises(ValueError, match="<modality>:<value>"):
        parse_prompt(["hello"], tokenizer)
    with pytest.raises(ValueError, match="<modality>:<value>"):
        parse_prompt(["video:x.mp4"], tokenizer)
    with pytest.raises(ValueError, match="does not exist"):
        parse_prompt(["image:missing.png"], tokenizer)
    write_png(str(tmp_path / "odd.png"), torch.rand(5, 5))
    with pytest.raises(ValueError, match="images here are 4x4"):
        parse_prompt([f"image:{tmp_path / 'odd.png'}"], tokenizer)
    write_wav(str(tmp_path / "fast.wav"), torch.zeros(100), 44100)
    with pytest.raises(ValueError, match="needs 8000 Hz"):
        parse_prompt([f"speech:{tmp_path / 'fast.wav'}"], tokenizer)
    model = momoe.build_model(tiny_config("transformer", tokenizer.vocab).replace(modalities=["text", "image"]))
    with pytest.raises(ValueError, match="modalities"):
        continue_document(model, tokenizer, parse_prompt([], tokenizer))
