"""The consumed-sample log (``distill.log_consumed``): which sample indices every rank trained on."""
from __future__ import annotations

import json
import os
from pathlib import Path


class ConsumedLog:
    """rank-NNNN.jsonl: {"step", "indices", "epochs"} per optimizer step of this rank. On a restart the
    lines of steps at or after the resume point are dropped (their updates were lost with the
    process), so the file always describes the training that counts."""

    def __init__(self, folder: Path, rank: int, resume_step: int):
        folder.mkdir(parents=True, exist_ok=True)
        self.path = folder / f"rank-{rank:04d}.jsonl"
        kept = []
        if self.path.exists():
            for line in self.path.read_text().splitlines():
                try:
                    if json.loads(line)["step"] < resume_step:
                        kept.append(line + "\n")
                except (json.JSONDecodeError, KeyError):
                    break  # a torn last line of a killed run
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text("".join(kept))
        os.replace(tmp, self.path)
        self._f = open(self.path, "a", buffering=1)

    def write(self, step: int, indices: list[int], epochs: list[int]) -> None:
        self._f.write(json.dumps({"step": step, "indices": indices, "epochs": epochs}) + "\n")

    def close(self) -> None:
        self._f.close()
