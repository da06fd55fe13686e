"""Learning-rate schedules equal transformers' get_scheduler step for step."""

import pytest
import torch
from transformers import get_scheduler

from tunesmith.training.schedule import lr_factor, warmup_steps_for


@pytest.mark.parametrize("kind", ["linear", "cosine", "constant", "constant_with_warmup"])
def test_matches_transformers(kind):
    total, warmup = 23, 5
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    scheduler = get_scheduler(kind, optimizer, num_warmup_steps=warmup, num_training_steps=total)
    for step in range(total):
        assert lr_factor(kind, step, total, warmup) == pytest.approx(optimizer.param_groups[0]["lr"], abs=1e-9)
        optimizer.step()
        scheduler.step()


def test_warmup_steps_win_over_ratio():
    assert warmup_steps_for(100, 7, 0.5) == 7
    assert warmup_steps_for(100, 0, 0.1) == 10
    assert warmup_steps_for(15, 0, 0.1) == 2  # ceil, as transformers
