"""PassThreads: a trial runs every candidate in turn and keeps the one with less time per decoded row."""

import torch

from tunesmith.sampling.pass_threads import LIGHT_PASS, PassThreads


def run_passes(chooser: PassThreads, count: int, seconds_per_row: dict[int, float], rows: int = 4) -> list[int]:
    picked = []
    for _ in range(count):
        threads = chooser.pick()
        picked.append(threads)
        chooser.record(threads, seconds_per_row[threads] * rows, rows)
    return picked


def test_trial_alternates_then_keeps_the_faster_candidate():
    chooser = PassThreads((2, 1), trial_passes=3, retrial_passes=5)
    picked = run_passes(chooser, 6, {2: 0.004, 1: 0.003})
    assert picked == [2, 1, 2, 1, 2, 1]  # both candidates see the same stretch of load
    assert chooser.chosen == 1
    assert run_passes(chooser, 5, {2: 0.004, 1: 0.003}) == [1] * 5


def test_time_is_compared_per_row_not_per_pass():
    chooser = PassThreads((2, 1), trial_passes=2, retrial_passes=100)
    for threads, seconds, rows in [(2, 0.010, 16), (1, 0.004, 4), (2, 0.010, 16), (1, 0.004, 4)]:
        assert chooser.pick() == threads
        chooser.record(threads, seconds, rows)
    assert chooser.chosen == 2  # 0.625 ms a row against 1 ms, though its passes took longer


def test_a_new_trial_follows_the_retrial_interval_and_can_change_the_choice():
    chooser = PassThreads((2, 1), trial_passes=2, retrial_passes=3)
    run_passes(chooser, 4, {2: 0.001, 1: 0.002})
    assert chooser.chosen == 2
    assert run_passes(chooser, 3, {2: 0.001, 1: 0.002}) == [2, 2, 2]
    assert run_passes(chooser, 4, {2: 0.003, 1: 0.002}) == [2, 1, 2, 1]  # the load changed
    assert chooser.chosen == 1


def test_one_candidate_is_always_picked():
    chooser = PassThreads((1, 1))
    assert run_passes(chooser, 100, {1: 0.001}) == [1] * 100


def test_light_passes_take_the_pick_and_heavy_ones_every_thread():
    before = torch.get_num_threads()
    try:
        chooser = PassThreads((2, 1), trial_passes=1)
        assert chooser.set_for(LIGHT_PASS) == 2 and torch.get_num_threads() == 2
        chooser.record(2, 0.01, 1)
        assert chooser.set_for(1) == 1 and torch.get_num_threads() == 1  # the trial's next candidate
        assert chooser.set_for(LIGHT_PASS + 1) is None and torch.get_num_threads() == 2
        assert chooser.timed == 1  # a heavy pass is no part of the trial
    finally:
        torch.set_num_threads(before)
