"""The training log: one JSON object per line, appended as training goes.

Each record: {"step", "loss", "loss_per_modality": {name: loss}, "aux_loss", "lr", "grad_norm",
"tokens_per_s", "tokens_seen", "elapsed_s"}. A resumed run first drops the records past its
checkpoint, so the log reads as if the run had never stopped.
"""
import json
import os
from typing import Any, Dict, List

from momoe.checkpoint import CheckpointError, _atomic_write

LOG_FILE = "log.jsonl"


def read_log(path: str) -> List[Dict[str, Any]]:
    """Every record of a JSONL log (a truncated last line, from a kill mid-write, is skipped)."""
    if not os.path.isfile(path):
        raise CheckpointError(f"momoe: {path} does not exist")
    records = []
    with open(path) as f:
        lines = f.read().split("\n")
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if number < len(lines):  # only a last line without its newline can be cut short
                raise CheckpointError(f"momoe: {path} line {number} is not JSON") from None
    return records


class JsonlLog:
    """Append records to `path`; `truncate(step)` keeps only the records up to `step`."""

    def __init__(self, path: str) -> None:
        self.path = path
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)

    def append(self, record: Dict[str, Any]) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(record, sort_keys=True) + "\n")

    def truncate(self, step: int) -> None:
        if not os.path.isfile(self.path):
            return
        kept = [r for r in read_log(self.path) if r.get("step", 0) <= step]

        def write(tmp: str) -> None:
            with open(tmp, "w") as f:
                f.writelines(json.dumps(r, sort_keys=True) + "\n" for r in kept)

        _atomic_write(self.path, write)
