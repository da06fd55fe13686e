"""Who am I in a data-parallel run: rank and world size from torchrun's environment (1 process otherwise).

The loop only asks `is_main` (log and save) and shards the data order by rank; a later data-parallel
stage adds process-group setup and gradient all-reduce without touching the loop's structure.
"""

from __future__ import annotations

import os
from dataclasses import dataclass


@dataclass(frozen=True)
class ProcessInfo:
    """This process's place in the run: `rank` of `world_size` processes."""

    rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        """Whether this process logs and saves: rank 0, so files are written once per run."""
        return self.rank == 0


def process_info() -> ProcessInfo:
    """Read RANK / WORLD_SIZE as torchrun sets them."""
    return ProcessInfo(int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)))
