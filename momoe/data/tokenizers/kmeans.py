"""K-means in PyTorch: the codebooks of the image and speech tokenizers.

k-means++ seeding (Arthur & Vassilvitskii, 2007), then Lloyd iterations; a cluster left empty is
re-seeded at the point farthest from its centroid. Distances are computed in chunks so memory stays
O(chunk * K). Deterministic for a given generator seed (on a given machine and thread count).

Shape legend: N points, D features, K clusters.
"""
import torch

CHUNK = 16384


def squared_distances(x: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """x (Tensor): `[N, D]`; centroids (Tensor): `[K, D]`. Returns `[N, K]` squared Euclidean distances."""
    d = x.square().sum(1, keepdim=True) - 2 * x @ centroids.T + centroids.square().sum(1)
    return d.clamp_min_(0)


def nearest(x: torch.Tensor, centroids: torch.Tensor) -> "tuple[torch.Tensor, torch.Tensor]":
    """x (Tensor): `[N, D]`; centroids (Tensor): `[K, D]`. Returns the nearest centroid of each point
    `[N]` (int64) and its squared distance `[N]`."""
    if x.dim() != 2 or centroids.dim() != 2 or x.shape[1] != centroids.shape[1]:
        raise ValueError(f"momoe: points {tuple(x.shape)} and centroids {tuple(centroids.shape)} must be "
                         f"(N, D) and (K, D)")
    index, dist = [], []
    for chunk in x.split(CHUNK):
        d_min, i_min = squared_distances(chunk, centroids).min(1)
        index.append(i_min)
        dist.append(d_min)
    if not index:
        return x.new_zeros(0, dtype=torch.long), x.new_zeros(0)
    return torch.cat(index), torch.cat(dist)


def kmeans_plus_plus(x: torch.Tensor, k: int, generator: torch.Generator) -> torch.Tensor:
    """k-means++ seeding: x (Tensor): `[N, D]`. Returns `[K, D]` initial centroids."""
    first = int(torch.randint(x.shape[0], (1,), generator=generator))
    centroids = [x[first]]
    closest = squared_distances(x, x[first][None])[:, 0]
    for _ in range(1, k):
        if float(closest.sum()) > 0:
            pick = int(torch.multinomial(closest, 1, generator=generator))
        else:  # fewer distinct points than clusters: duplicates are all that is left
            pick = int(torch.randint(x.shape[0], (1,), generator=generator))
        centroids.append(x[pick])
        closest = torch.minimum(closest, squared_distances(x, x[pick][None])[:, 0])
    return torch.stack(centroids)


def kmeans(x: torch.Tensor, k: int, iters: int = 25, seed: int = 0) -> torch.Tensor:
    """Cluster points into k centroids.

    Args:
        x (Tensor): points `[N, D]`, float, N >= k.
        k (int): number of clusters; iters (int): Lloyd iterations; seed (int): seeding generator.
    Returns:
        centroids `[K, D]` (float32).

    Example:
        >>> c = kmeans(torch.randn(1000, 4), k=8)
        >>> c.shape
        torch.Size([8, 4])
    """
    if x.dim() != 2 or not x.is_floating_point():
        raise ValueError(f"momoe: kmeans needs float points of shape (N, D), got {x.dtype} {tuple(x.shape)}")
    if not 0 < k <= x.shape[0]:
        raise ValueError(f"momoe: kmeans needs 0 < k <= N points, got k={k}, N={x.shape[0]}")
    x = x.float()
    generator = torch.Generator().manual_seed(seed)
    centroids = kmeans_plus_plus(x, k, generator)
    for _ in range(iters):
        assign, dist = nearest(x, centroids)
        counts = torch.bincount(assign, minlength=k)
        sums = torch.zeros_like(centroids).index_add_(0, assign, x)
        centroids = torch.where(counts[:, None] > 0, sums / counts.clamp_min(1)[:, None], centroids)
        empty = (counts == 0).nonzero()[:, 0]
        if empty.numel():
            centroids[empty] = x[dist.topk(empty.numel()).indices]
    return centroids
