"""K-means: separated clusters are found, and the seeding is reproducible."""
import pytest
import torch

from momoe.data.tokenizers import kmeans, nearest


def test_recovers_separated_clusters():
    gen = torch.Generator().manual_seed(0)
    centres = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0], [10.0, 10.0]])
    labels = torch.randint(4, (400,), generator=gen)
    x = centres[labels] + 0.1 * torch.randn(400, 2, generator=gen)
    found = kmeans(x, 4, seed=1)
    assign = nearest(x, found)[0]
    # the same partition as the true labels, up to renaming the clusters
    pairs = set(zip(labels.tolist(), assign.tolist()))
    assert len(pairs) == 4
    assert torch.equal(found, kmeans(x, 4, seed=1))


def test_more_clusters_than_distinct_points_and_errors():
    x = torch.tensor([[0.0], [0.0], [1.0], [1.0]])
    c = kmeans(x, 3)
    assert c.shape == (3, 1) and set(nearest(x, c)[1].tolist()) == {0.0}
    with pytest.raises(ValueError, match="0 < k <= N"):
        kmeans(x, 5)
    with pytest.raises(ValueError, match="float points"):
        kmeans(torch.zeros(4, dtype=torch.long), 2)
