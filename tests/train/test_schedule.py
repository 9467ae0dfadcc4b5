"""Warmup + cosine learning-rate schedule and the training settings."""
import math

import pytest
import torch

from momoe.train import TrainConfig, WarmupCosine


def test_warmup_is_linear_and_reaches_the_peak():
    s = WarmupCosine(lr=1e-3, warmup=4, total=20, min_lr_ratio=0.1)
    assert [s(i) for i in range(4)] == pytest.approx([2.5e-4, 5e-4, 7.5e-4, 1e-3])
    assert s(4) == pytest.approx(1e-3)


def test_cosine_decays_to_the_floor():
    lr, warmup, total, ratio = 2e-3, 3, 14, 0.25
    s = WarmupCosine(lr=lr, warmup=warmup, total=total, min_lr_ratio=ratio)
    for step in range(warmup, total):
        progress = (step - warmup) / (total - warmup - 1)
        expected = lr * ratio + (lr - lr * ratio) * 0.5 * (1 + math.cos(math.pi * progress))
        assert s(step) == pytest.approx(expected)
    assert s(total - 1) == pytest.approx(lr * ratio)
    decay = [s(i) for i in range(warmup, total)]
    assert decay == sorted(decay, reverse=True)
    midpoint = warmup + (total - warmup - 1) // 2
    assert s(midpoint) == pytest.approx(lr * (1 + ratio) / 2)


def test_edge_cases():
    assert WarmupCosine(lr=1.0, warmup=0, total=1)(0) == 1.0  # one update: the peak
    assert WarmupCosine(lr=1.0, warmup=3, total=3)(2) == 1.0  # warmup only
    with pytest.raises(ValueError, match="outside the schedule"):
        WarmupCosine(lr=1.0, warmup=0, total=5)(5)
    with pytest.raises(ValueError, match="warmup <= total"):
        WarmupCosine(lr=1.0, warmup=6, total=5)


def test_apply_sets_every_group_and_state_round_trips():
    params = [torch.nn.Parameter(torch.zeros(2, 2)), torch.nn.Parameter(torch.zeros(2))]
    opt = torch.optim.AdamW([{"params": params[:1]}, {"params": params[1:]}], lr=1.0)
    s = WarmupCosine(lr=0.5, warmup=2, total=10)
    assert s.apply(opt, 0) == 0.25
    assert [g["lr"] for g in opt.param_groups] == [0.25, 0.25]
    assert WarmupCosine.from_dict(s.to_dict()) == s
    with pytest.raises(ValueError, match="malformed schedule"):
        WarmupCosine.from_dict({"lr": 1.0, "warmup": 0, "total": 3, "bogus": 1})


def test_train_config_checks_and_round_trips():
    config = TrainConfig(steps=50, warmup=None, betas=[0.9, 0.99])
    assert config.warmup_steps == 5 and config.betas == (0.9, 0.99)
    assert TrainConfig.from_dict(config.to_dict()) == config
    for bad in (dict(steps=0), dict(batch_size=0), dict(warmup=60, steps=50), dict(lr=0.0), dict(betas=(0.9, 1.0)),
                dict(clip=-1.0), dict(min_lr_ratio=2.0)):
        with pytest.raises(ValueError, match="momoe: "):
            TrainConfig(**bad)
    with pytest.raises(ValueError, match="unknown TrainConfig keys"):
        TrainConfig.from_dict({"stepz": 3})
