"""Equal-FLOPs comparisons and the dense-FLOPs efficiency measure."""
import math

import pytest

from momoe.models import flops_per_token
from momoe.train import TrainConfig, compare_models, dense_flops_to_reach
from momoe.train.compare import CompareRun, Efficiency, efficiencies, flops_per_step, format_comparison, modality_mix
from tests.train.helpers import tiny_config


def test_dense_flops_to_reach_interpolates_in_log_flops():
    curve = [(1e3, 5.0), (1e4, 4.0), (1e5, 3.0)]
    assert dense_flops_to_reach(curve, 5.5) == 1e3  # already there at the first evaluation
    assert dense_flops_to_reach(curve, 4.0) == pytest.approx(1e4)
    assert dense_flops_to_reach(curve, 3.5) == pytest.approx(math.sqrt(1e4 * 1e5))  # halfway in log FLOPs
    assert dense_flops_to_reach(curve, 2.0) is None
    assert dense_flops_to_reach([(1.0, 3.0), (2.0, 5.0), (4.0, 2.0)], 2.5) == pytest.approx(2 * 2 ** (5 / 6))


def test_efficiency_against_the_dense_curve():
    curve = [(250.0, {"text": 4.0}), (500.0, {"text": 3.0}), (1000.0, {"text": 2.0})]
    dense = CompareRun("dense", 10.0, 100, curve, 1.0)
    sparse = CompareRun("moe", 10.0, 50, [(500.0, {"text": 3.0})], 1.0)  # at 500 FLOPs what dense reaches at 500
    assert efficiencies(dense, sparse)["text"].ratio == pytest.approx(1.0)
    better = CompareRun("moe", 5.0, 50, [(250.0, {"text": 2.0})], 1.0)  # dense needs 1000: 4x
    assert efficiencies(dense, better)["text"] == Efficiency(pytest.approx(4.0))
    best = CompareRun("moe", 5.0, 50, [(250.0, {"text": 1.0})], 1.0)  # never reached by dense: at least 4x
    assert str(efficiencies(dense, best)["text"]) == ">4.00x"
    assert efficiencies(dense, dense)["text"].ratio == pytest.approx(1.0)


def test_flops_per_step_uses_the_modality_mix(train_data):
    config = tiny_config("moma", train_data.vocab)
    train = TrainConfig(batch_size=3, seq_len=32, grad_accum=2)
    mix = modality_mix(train_data)
    assert sum(mix.values()) == pytest.approx(1.0)
    per_token = flops_per_token(config, 32)
    expected = 6 * 32 * sum(mix[m] * per_token[m] for m in mix)
    assert flops_per_step(config, train, mix) == pytest.approx(expected)


def test_compare_models_end_to_end(train_data, validation_data):
    configs = {name: tiny_config(name, train_data.vocab) for name in ("transformer", "mom-mamba")}
    base = TrainConfig(steps=1, batch_size=2, seq_len=32)
    budget = 4 * flops_per_step(configs["transformer"], base, modality_mix(train_data))
    runs = compare_models(configs, train_data, validation_data, base, budget, evaluations=2, eval_batches=1,
                          progress=False)
    assert [r.name for r in runs] == ["transformer", "mom-mamba"]
    dense = runs[0]
    assert dense.steps == 4 and [f for f, _ in dense.curve] == pytest.approx([2 * dense.flops_per_step, dense.flops])
    for run in runs:
        assert run.flops <= budget and run.steps == int(budget // run.flops_per_step)
        assert set(run.final) == {"text", "image", "speech", "all"} and set(run.efficiency) == set(run.final)
    assert dense.efficiency["all"].ratio == pytest.approx(1.0)
    table = format_comparison(runs, "transformer")
    assert "mom-mamba" in table and "image loss" in table and "vs transformer" in table
    with pytest.raises(ValueError, match="dense baseline"):
        compare_models(configs, train_data, validation_data, base, budget, dense="nope")
    with pytest.raises(ValueError, match="buys no update"):
        compare_models(configs, train_data, validation_data, base, 1.0)
