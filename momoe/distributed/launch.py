"""Run a function as a multi-process torch.distributed job on this machine (tests, benchmarks, notebooks).

`spawn(fn, nprocs, args)` is `torchrun --standalone --nproc-per-node nprocs` for a function: it picks a
free port on 127.0.0.1, starts nprocs fresh processes (the "spawn" start method) with torchrun's
environment variables, calls `init_distributed()` in each, runs `fn(*args)` and returns every rank's
result. When a process raises or dies, the others are terminated and the error, with the failing
rank's traceback, is raised in the caller.
"""
import os
import pickle
import socket
from typing import Any, Callable, List, Optional, Sequence

import torch
import torch.multiprocessing as mp
from torch.multiprocessing.spawn import ProcessException

from momoe.distributed.parallel import destroy_distributed, init_distributed


def free_port() -> int:
    """A TCP port nothing listens on right now (for MASTER_PORT)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, nprocs: int, port: int, backend: Optional[str], timeout_s: float, threads: int,
            fn: Callable[..., Any], args: Sequence[Any], results: Any) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(nprocs), LOCAL_WORLD_SIZE=str(nprocs),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(threads)
    init_distributed(backend=backend, timeout_s=timeout_s)
    result = fn(*args)
    destroy_distributed()
    results.put((rank, pickle.dumps(result)))  # by value: tensors are copied, not shared


def spawn(fn: Callable[..., Any], nprocs: int, args: Sequence[Any] = (), *, backend: Optional[str] = None,
          timeout_s: float = 60.0, threads: Optional[int] = None) -> List[Any]:
    """Run `fn(*args)` on `nprocs` ranks of a fresh local job and return their results in rank order.

    Args:
        fn: a picklable (module-level) function; it finds its rank with torch.distributed.get_rank().
        nprocs (int): number of processes (ranks).
        args: arguments of fn (picklable).
        backend (str): see `init_distributed` (None: NCCL with CUDA, else gloo).
        timeout_s (float): the collective timeout of the job (a rank waiting longer for the others fails).
        threads (int): torch threads per process (None: the CPU cores divided among the processes).

    Returns:
        [fn's result on rank 0, on rank 1, ...] (results must be picklable).

    Raises:
        RuntimeError: a rank raised or died; the message carries its traceback.

    Example::

        >>> def world() -> int:
        ...     return torch.distributed.get_world_size()
        >>> spawn(world, 2)
        [2, 2]
    """
    if nprocs < 1:
        raise ValueError(f"momoe: nprocs must be >= 1, got {nprocs}")
    threads = threads or max(1, (os.cpu_count() or 1) // nprocs)
    results = mp.get_context("spawn").SimpleQueue()
    job = mp.start_processes(_worker, args=(nprocs, free_port(), backend, timeout_s, threads, fn, tuple(args), results),
                             nprocs=nprocs, join=False, start_method="spawn")
    out = {}
    try:
        while not job.join(timeout=0.05):
            while not results.empty():  # drain as they come: a full pipe would block a child's put
                rank, data = results.get()
                out[rank] = pickle.loads(data)
    except ProcessException as error:  # join() has terminated the other processes
        raise RuntimeError(f"momoe: rank {error.error_index} of {nprocs} failed:{error}") from None
    while not results.empty():
        rank, data = results.get()
        out[rank] = pickle.loads(data)
    return [out[r] for r in range(nprocs)]
