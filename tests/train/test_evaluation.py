"""Evaluation: token-weighted per-modality losses over every target, perplexity = exp(loss)."""
import math

import pytest
import torch

import momoe
from momoe.train import evaluate
from tests.train.helpers import tiny_config


def reference_losses(model, dataset):
    """Each document on its own row: cross entropy of every next token, summed per modality."""
    sums, counts = {}, {}
    with torch.no_grad():
        for ids, mods in dataset:
            logits = model(ids[None], mods[None]).logits[0, :-1]
            losses = torch.nn.functional.cross_entropy(logits, ids[1:], reduction="none")
            for m, name in enumerate(model.config.modalities):
                mask = mods[1:] == m
                sums[name] = sums.get(name, 0.0) + float(losses[mask].sum())
                counts[name] = counts.get(name, 0) + int(mask.sum())
    return sums, counts


@pytest.mark.parametrize("family", ["transformer", "mom-mamba"])
def test_evaluate_matches_a_per_document_reference(validation_data, family):
    torch.manual_seed(0)
    model = momoe.build_model(tiny_config(family, validation_data.vocab))
    assert validation_data.num_tokens <= 400  # one row holds every document: no document is cut
    result = evaluate(model, validation_data, batch_size=2, seq_len=400)
    sums, counts = reference_losses(model, validation_data)
    assert result.tokens_per_modality == counts
    for name in counts:
        assert result.loss_per_modality[name] == pytest.approx(sums[name] / counts[name], rel=1e-5)
    assert result.loss == pytest.approx(sum(sums.values()) / sum(counts.values()), rel=1e-5)
    assert result.perplexity == pytest.approx(math.exp(result.loss))
    assert model.training  # the mode is restored


def test_evaluate_max_batches_and_bad_inputs(validation_data):
    model = momoe.build_model(tiny_config("moma", validation_data.vocab))
    part = evaluate(model, validation_data, batch_size=1, seq_len=32, max_batches=2)
    assert 0 < sum(part.tokens_per_modality.values()) <= 2 * 31
    assert evaluate(model, validation_data, batch_size=2, seq_len=64, causal_routing=True).loss > 0
    with pytest.raises(ValueError, match="max_batches"):
        evaluate(model, validation_data, max_batches=0)
    other = momoe.build_model(tiny_config("moma", validation_data.vocab).replace(vocab_size=10))
    with pytest.raises(ValueError, match="vocab_size"):
        evaluate(other, validation_data)
