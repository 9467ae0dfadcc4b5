"""Linear merging of checkpoints and the data-mixture search over merged models."""
import math

import pytest
import torch

import momoe
from momoe.train import linear_merge, load_checkpoints, mixture_search, simplex_grid
from tests.train.helpers import tiny_config


def test_linear_merge_arithmetic():
    gen = torch.Generator().manual_seed(0)
    states = [{"w": torch.randn(3, 4, generator=gen), "b": torch.randn(4, generator=gen).to(torch.bfloat16)}
              for _ in range(3)]
    weights = [0.5, 0.3, 0.2]
    merged = linear_merge(states, weights)
    expected_w = sum(w * s["w"] for w, s in zip(weights, states))
    torch.testing.assert_close(merged["w"], expected_w, atol=1e-6, rtol=1e-6)
    assert merged["b"].dtype == torch.bfloat16  # accumulated in fp32, cast back
    expected_b = sum(w * s["b"].float() for w, s in zip(weights, states)).to(torch.bfloat16)
    assert torch.equal(merged["b"], expected_b)
    assert torch.equal(linear_merge(states, [1.0, 0.0, 0.0])["w"], states[0]["w"])
    assert torch.equal(linear_merge(states[:2], [0.5, 0.5])["w"], linear_merge(states[1::-1], [0.5, 0.5])["w"])


def test_linear_merge_bad_inputs():
    a = {"w": torch.zeros(2, 2)}
    with pytest.raises(ValueError, match="one weight per checkpoint"):
        linear_merge([a, a], [1.0])
    with pytest.raises(ValueError, match="other tensors"):
        linear_merge([a, {"v": torch.zeros(2, 2)}], [0.5, 0.5])
    with pytest.raises(ValueError, match="other shapes or dtypes"):
        linear_merge([a, {"w": torch.zeros(2, 3)}], [0.5, 0.5])


def test_simplex_grid():
    assert simplex_grid(2, 4) == [(0.0, 1.0), (0.25, 0.75), (0.5, 0.5), (0.75, 0.25), (1.0, 0.0)]
    grid = simplex_grid(3, 4)
    assert len(grid) == math.comb(4 + 2, 2) and len(set(grid)) == len(grid)
    assert all(min(p) >= 0 and math.isclose(sum(p), 1.0) for p in grid)
    assert simplex_grid(1, 3) == [(1.0,)]
    with pytest.raises(ValueError, match="resolution"):
        simplex_grid(2, 0)


def test_mixture_search_finds_the_best_mixture():
    """Three 'domain experts' are the corners of a triangle; the score is the distance of the merged
    point to a target mixture, so the search must return the grid point closest to it."""
    corners = [torch.tensor([0.0, 0.0]), torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])]
    states = [{"theta": c} for c in corners]
    target = 0.5 * corners[0] + 0.2 * corners[1] + 0.3 * corners[2]

    def score(state):
        distance = float((state["theta"] - target).norm())
        return distance, {"distance": distance}

    results = mixture_search(states, score, resolution=10)
    assert len(results) == math.comb(12, 2)
    assert results[0].weights == pytest.approx((0.5, 0.2, 0.3)) and results[0].score == pytest.approx(0, abs=1e-6)
    assert [r.score for r in results] == sorted(r.score for r in results)


def save(model, path):
    model.save_pretrained(str(path))
    return str(path)


def test_load_checkpoints_checks_architectures(tmp_path, train_data):
    config = tiny_config("transformer", train_data.vocab)
    a = save(momoe.build_model(config), tmp_path / "a")
    b = save(momoe.build_model(config), tmp_path / "b")
    loaded, states = load_checkpoints([a, b])
    assert loaded == config and len(states) == 2
    c = save(momoe.build_model(config.replace(d_model=48)), tmp_path / "c")
    with pytest.raises(ValueError, match=r"different architectures \(config fields \['d_model'\] differ\)"):
        load_checkpoints([a, c])
    d = save(momoe.build_model(tiny_config("mamba", train_data.vocab)), tmp_path / "d")
    with pytest.raises(ValueError, match="different architectures"):
        load_checkpoints([a, d])
    with pytest.raises(ValueError, match="at least two"):
        load_checkpoints([a])
    with pytest.raises(ValueError, match="neither a checkpoint"):
        load_checkpoints([a, str(tmp_path)])
