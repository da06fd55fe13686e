"""The stage registry: every training method tunesmith knows, by its `stage:` name.

Adding a method is one module here that defines `STAGE = StageSpec(...)` (see spec.py) and one line
below; config loading, `tunesmith train --help`, run.py and the adapter setup read this table.
"""

from tunesmith.training.stages import dpo, grpo, kto, ppo, rm, sft
from tunesmith.training.stages.spec import StageInputs, StageSpec

STAGES: dict[str, StageSpec] = {spec.name: spec for spec in (
    sft.STAGE,
    rm.STAGE,
    dpo.STAGE,
    kto.STAGE,
    ppo.STAGE,
    grpo.STAGE,
)}

__all__ = ["STAGES", "StageInputs", "StageSpec"]
