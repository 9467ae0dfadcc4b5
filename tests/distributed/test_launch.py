"""spawn: failures that end the job with a clear error instead of a hang."""
import time

import pytest
import torch
import torch.distributed as dist

from momoe.distributed import spawn
from tests.distributed.helpers import WORLD

TIMEOUT_S = 3.0


def _rank_one_raises():
    if dist.get_rank() == 1:
        raise ValueError("boom on purpose")
    dist.all_reduce(torch.ones(1))  # rank 0 waits for a rank that has died


def _rank_one_hangs():
    if dist.get_rank() == 1:
        time.sleep(120)  # alive but never joins the collective
    dist.all_reduce(torch.ones(1))


@pytest.mark.parametrize("fn, expected", [
    (_rank_one_raises, "rank 1 of 2 failed.*ValueError: boom on purpose"),
    (_rank_one_hangs, "rank 0 of 2 failed.*Timed out"),
], ids=["raises", "hangs"])
def test_failure_ends_the_job_with_a_clear_error(fn, expected):
    start = time.monotonic()
    with pytest.raises(RuntimeError, match=f"(?s){expected}"):
        spawn(fn, WORLD, timeout_s=TIMEOUT_S, threads=1)
    assert time.monotonic() - start < 30, "the job should end soon after the collective timeout"


def test_bad_process_count():
    with pytest.raises(ValueError, match="nprocs must be >= 1"):
        spawn(_rank_one_raises, 0)
