"""Rows that start alike under one adapter read the shared tokens once (shared_prefix.py): fewer tokens
read, and every row still answering as it does alone through `generate`."""

import threading

import torch

from tests.sampling.test_scheduler import GREEDY, SAMPLED, alone, request, with_side_sets
from tunesmith.config import SamplingSettings
from tunesmith.sampling import shared_prefix
from tunesmith.sampling.rows import Row, RowGroup, RowRequest
from tunesmith.sampling.scheduler import DecodeScheduler
from tunesmith.sampling.slot_decoder import SlotDecoder


def counting(monkeypatch):
    """Every chunk the slot decoder reads, as (slot, start, tokens)."""
    read = []
    forward = SlotDecoder.forward

    def counted(self, tokens, positions, chunks, adapters):
        read.extend((chunk.slot, chunk.start, len(chunk.ids)) for chunk in chunks)
        return forward(self, tokens, positions, chunks, adapters)

    monkeypatch.setattr(SlotDecoder, "forward", counted)
    return read


def test_rows_that_start_alike_read_the_shared_tokens_once_and_answer_as_alone(make_tiny_model, monkeypatch):
    model = with_side_sets(make_tiny_model("llama", seed=3))
    prompt = list(range(5, 35))  # 30 tokens
    cousin = prompt[:10] + list(range(60, 75))  # shares the first 10
    rows = [(prompt, GREEDY, None, None), (prompt, SAMPLED[0], None, 11), (prompt, SAMPLED[2], None, 12),
            (cousin, GREEDY, None, None), (prompt, GREEDY, "kind", None)]
    expected = [alone(model, *row) for row in rows]
    read = counting(monkeypatch)
    scheduler = DecodeScheduler(model, max_rows=8)
    groups = scheduler.run_here([[request(*row) for row in rows[:3]], [request(*rows[3])], [request(*rows[4])]])
    answers = [answer for group in groups for answer in group.result().response_ids]
    assert answers == expected
    # the first row reads 30; the next two wait a pass, copy 29 and read the last; the cousin shares fewer
    # than MIN_SHARED tokens and reads all 25; the "kind" row shares nothing (another adapter's keys
    # differ) and reads all 30
    assert sorted((start, tokens) for _, start, tokens in read) == [(0, 25), (0, 30), (0, 30), (29, 1), (29, 1)]


def test_a_row_joining_later_copies_what_a_decoding_row_has_read(make_tiny_model, monkeypatch):
    model = make_tiny_model("qwen2", seed=1)
    prompt = list(range(3, 43))
    long_settings = SamplingSettings(max_new_tokens=30, do_sample=False)
    started = threading.Event()
    read = counting(monkeypatch)
    scheduler = DecodeScheduler(model, max_rows=4)
    first = scheduler.submit([request(prompt, long_settings, on_token=lambda token: started.set())])
    assert started.wait(30)
    second = scheduler.submit([request(prompt + [50, 51], GREEDY)])
    assert second.result(timeout=60).response_ids[0] == alone(model, prompt + [50, 51], GREEDY)
    assert first.result(timeout=60).response_ids[0] == alone(model, prompt, long_settings)
    # the first row's answer tokens follow its prompt in its cache: only the 40 prompt positions are shared
    assert [(start, tokens) for _, start, tokens in read] == [(0, 40), (40, 2)]


def test_a_row_that_observes_its_prompt_copies_only_the_positions_before_states_from(make_tiny_model, monkeypatch):
    model = make_tiny_model("llama", seed=2)
    prompt = list(range(2, 40))
    seen = {"all": [], "tail": []}

    def observer(name):
        return lambda states, start: seen[name].append((start, states.clone()))

    read = counting(monkeypatch)
    rows = [request(prompt, GREEDY), request(prompt, GREEDY, on_prompt=observer("all")),
            RowRequest(prompt, GREEDY, [1], on_prompt=observer("tail"), states_from=20)]
    DecodeScheduler(model, max_rows=4).run_here([rows])
    assert sorted((start, tokens) for _, start, tokens in read) == [(0, 38), (0, 38), (20, 18)]
    with torch.no_grad():
        expected = model.model(torch.tensor([prompt])).last_hidden_state[0]
    assert [start for start, _ in seen["all"]] == [0] and [start for start, _ in seen["tail"]] == [20]
    torch.testing.assert_close(seen["all"][0][1], expected, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(seen["tail"][0][1], expected[20:], atol=1e-5, rtol=1e-4)


def test_kin_are_rows_of_the_same_adapter_that_start_alike_and_leave_when_released(monkeypatch):
    monkeypatch.setattr(shared_prefix, "MIN_SHARED", 2)
    def row(prompt, adapter=None):
        request = RowRequest(prompt, GREEDY, [], adapter=adapter)
        return Row(request, RowGroup([request]), 16, torch.device("cpu"))

    assert shared_prefix.common_length([1, 2, 3, 4], [1, 2, 9, 4]) == 2
    assert shared_prefix.common_length([1, 2], [1, 2, 3]) == 2
    long = list(range(300))
    for differs_at in (0, 63, 64, 65, 200, 299):
        other = long[:differs_at] + [-1] + long[differs_at + 1:]
        assert shared_prefix.common_length(long, other) == differs_at
    assert shared_prefix.common_length(long, long[:130]) == 130 and shared_prefix.common_length([], long) == 0
    live = [row([1, 2, 3]), row([1, 2, 3], "kind"), row([7, 8]), row([1, 9])]
    new = [row([1, 2, 5]), row([1, 2, 3, 4])]
    shared_prefix.link(new, live)
    assert [(kin.serial, shared) for kin, shared in new[1].kin] == [(live[0].serial, 3), (new[0].serial, 2)]
    assert [(kin.serial, shared) for kin, shared in live[0].kin] == [(new[0].serial, 2), (new[1].serial, 3)]
    assert live[1].kin == [] and live[2].kin == [] and live[3].kin == []  # another adapter; nothing; 1 < 2 shared
    shared_prefix.leave(new[0], {}, copy=None)  # nobody reading: nothing to copy
    assert [kin.serial for kin, _ in live[0].kin] == [new[1].serial]
    assert [kin.serial for kin, _ in new[1].kin] == [live[0].serial]


def test_a_row_waits_for_a_kin_reading_its_prefix_only_when_that_saves_half_of_its_prompt(make_tiny_model, monkeypatch):
    model = make_tiny_model("llama", seed=4)
    head = list(range(2, 22))  # 20 tokens, shared by every prompt below
    short_tail, long_tail = head + list(range(40, 50)), head + list(range(50, 90))
    read = counting(monkeypatch)
    rows = [(head + list(range(25, 35)), GREEDY), (short_tail, GREEDY), (long_tail, GREEDY)]
    groups = DecodeScheduler(model, max_rows=4).run_here([[request(*row)] for row in rows])
    assert [g.result().response_ids[0] for g in groups] == [alone(model, *row) for row in rows]
    # 30 tokens with 20 shared: waiting copies 20 of 30 left, so it waits; 60 with 20 shared reads at once
    assert sorted((start, tokens) for _, start, tokens in read) == [(0, 30), (0, 60), (20, 10)]


def test_rows_waiting_on_a_kin_that_ends_in_the_pass_it_reads_copy_before_it_leaves(make_tiny_model, monkeypatch):
    model = make_tiny_model("qwen2", seed=5)
    prompt, one = list(range(4, 34)), SamplingSettings(max_new_tokens=1, do_sample=False)
    read = counting(monkeypatch)
    group = DecodeScheduler(model, max_rows=4).run_here([[request(prompt, one) for _ in range(4)]])[0]
    assert group.result().response_ids == [alone(model, prompt, one)] * 4
    assert sorted((start, tokens) for _, start, tokens in read) == [(0, 30), (29, 1), (29, 1), (29, 1)]


def test_with_keep_finished_the_next_turn_reads_only_what_is_new(make_tiny_model, monkeypatch):
    model = with_side_sets(make_tiny_model("llama", seed=6))
    first = list(range(3, 33))
    turn = SamplingSettings(max_new_tokens=12, do_sample=False)
    read = counting(monkeypatch)
    kept = DecodeScheduler(model, max_rows=4, keep_finished=True)
    answer = kept.run([request(first, turn)]).response_ids[0]
    second = first + answer + [40, 41, 42]  # the conversation so far, then the new message
    assert kept.run([request(second, turn)]).response_ids[0] == alone(model, second, turn)
    # the first turn's cache holds its prompt and every answer token but the last, never fed back
    assert [(start, tokens) for _, start, tokens in read] == [(0, 30), (29 + len(answer), 4)]
    assert kept.decoder.keys.shape[1] == 1  # the next turn takes the kept slot: no room beside it is needed
    read.clear()
    assert kept.run([request(second, turn, "kind")]).response_ids[0] == alone(model, second, turn, "kind")
    assert [(start, tokens) for _, start, tokens in read] == [(0, len(second))]  # another adapter: no reuse
    read.clear()
    DecodeScheduler(model, max_rows=4).run([request(second, turn)])
    assert [(start, tokens) for _, start, tokens in read] == [(0, len(second))]  # off by default


def test_a_row_takes_the_kept_slot_that_shares_most_whichever_slot_it_is_in(make_tiny_model, monkeypatch):
    model = make_tiny_model("qwen2", seed=7)
    firsts = [list(range(3, 23)), list(range(100, 125)), list(range(3, 13)) + list(range(60, 80))]
    scheduler = DecodeScheduler(model, max_rows=4, keep_finished=True)
    groups = scheduler.run_here([[request(prompt, GREEDY)] for prompt in firsts])
    answers = [group.result().response_ids[0] for group in groups]
    assert len(scheduler.kept) == 3
    read = counting(monkeypatch)
    later = firsts[1] + answers[1] + [7, 8]
    assert scheduler.run([request(later, GREEDY)]).response_ids[0] == alone(model, later, GREEDY)
    assert [(start, tokens) for _, start, tokens in read] == [(len(later) - 3, 3)]
    assert len(scheduler.kept) == 3  # the new row's own slot, kept in turn; the two it did not use stay


def test_take_kept_swaps_the_best_slot_into_each_rows_own_and_forgets_what_rows_take_over():
    def row(prompt, adapter=None):
        request = RowRequest(prompt, GREEDY, [], adapter=adapter)
        return Row(request, RowGroup([request]), 16, torch.device("cpu"))

    a, b, c = list(range(20)), list(range(50, 70)), list(range(100, 130))
    kept = {1: (a, None, 0), 2: (b, None, 1), 3: (c, "kind", 2)}
    swaps = []
    rows = [row(b + [1, 2]), row(c + [3]), row(a[:5] + b)]  # slots 1, 2, 3 of 4: no free slot past them
    shared_prefix.take_kept(rows, 1, 4, kept, lambda first, second, length: swaps.append((first, second, length)))
    # row 0 takes b from slot 2 (a moves there); row 1 wants c under adapter None: none, so it overwrites
    # slot 2 (a is gone); row 2 shares under 16 tokens with anything: it overwrites slot 3 (c is gone)
    assert swaps == [(2, 1, 20)]
    assert [r.length for r in rows] == [20, 0, 0] and kept == {}


def test_kept_slots_a_regrown_cache_did_not_copy_are_forgotten(make_tiny_model, monkeypatch):
    """A fresh batch larger than max_cached_tokens (an empty batch always admits its group) regrows the
    cache keeping only the kept slots within the budget: a row must not start from one it zeroed."""
    model = make_tiny_model("llama", seed=3)
    turn, long_turn = SamplingSettings(max_new_tokens=10, do_sample=False), SamplingSettings(max_new_tokens=80, do_sample=False)
    scheduler = DecodeScheduler(model, max_rows=8, max_cached_tokens=100, keep_finished=True)
    first = list(range(3, 23))
    answer = scheduler.run([request(first, turn)]).response_ids[0]
    second = first + answer + [40, 41, 42]  # capacity 113 > 100: no slot is kept across the regrowth
    assert scheduler.run([request(second, long_turn)]).response_ids[0] == alone(model, second, long_turn)

    heads = [list(range(2 + 20 * i, 19 + 20 * i)) for i in range(4)]  # four 17-token prompts, 4 x 20 positions
    scheduler = DecodeScheduler(model, max_rows=8, max_cached_tokens=100, keep_finished=True)
    scheduler.run([request(head, SamplingSettings(max_new_tokens=3, do_sample=False)) for head in heads])
    read = counting(monkeypatch)
    last = max(scheduler.kept)  # beyond the 3 slots of 32 positions the next group's budget keeps
    rows = [scheduler.kept[last][0][:17] + [5, 6, 7]] + [[90 + i] * 20 for i in range(3)]
    answers = scheduler.run([request(prompt, long_turn) for prompt in rows]).response_ids
    assert answers == [alone(model, prompt, long_turn) for prompt in rows]
    assert sorted(tokens for _, _, tokens in read) == [20, 20, 20, 20]  # nothing was copied from a zeroed slot
    assert scheduler.decoder.positions > 100  # that group was admitted alone, over the budget
    scheduler.run([request(rows[0], turn)])
    assert scheduler.decoder.positions <= 100  # kept slots never hold an oversized cache past its batch


def test_a_row_that_starts_from_nothing_moves_the_kept_slot_it_lands_on_to_an_empty_or_older_one():
    request = RowRequest(list(range(200, 220)), GREEDY, [])
    a, b, c, d = (list(range(start, start + 20)) for start in (0, 30, 60, 90))
    swaps = []

    def take(kept, slots):
        swaps.clear()
        fresh = Row(request, RowGroup([request]), 16, torch.device("cpu"))
        shared_prefix.take_kept([fresh], 0, slots, kept, lambda *args: swaps.append(args))
        return kept

    # slot 1 is free and empty: a moves there
    assert take({0: (a, None, 5), 2: (b, None, 1)}, 6) == {1: (a, None, 5), 2: (b, None, 1)} and swaps == [(1, 0, 20)]
    # no empty slot: a takes the place of b, kept least recently
    kept = {0: (a, None, 5), 1: (b, None, 1), 2: (c, None, 9), 3: (d, None, 7)}
    assert take(kept, 4) == {1: (a, None, 5), 2: (c, None, 9), 3: (d, None, 7)} and swaps == [(1, 0, 20)]
    # a is the least recently kept: it is the one overwritten
    assert take({0: (a, None, 0), 1: (b, None, 1)}, 2) == {1: (b, None, 1)} and swaps == []


def test_a_conversations_last_turn_outlives_a_request_that_comes_between(make_tiny_model, monkeypatch):
    model = make_tiny_model("llama", seed=8)
    scheduler = DecodeScheduler(model, max_rows=4, keep_finished=True)
    short, long = SamplingSettings(max_new_tokens=4, do_sample=False), SamplingSettings(max_new_tokens=10, do_sample=False)
    first, second = list(range(3, 23)), list(range(40, 60))
    groups = scheduler.run_here([[request(first, short)], [request(second, long)]])  # `second` ends last
    answers = [group.result().response_ids[0] for group in groups]
    scheduler.run([request(list(range(70, 95)), short)])  # another client: it lands on a kept slot
    read = counting(monkeypatch)
    later = second + answers[1] + [5, 6]
    assert scheduler.run([request(later, short)]).response_ids[0] == alone(model, later, short)
    assert [tokens for _, _, tokens in read] == [3]  # the newer conversation was kept; the older one gave way


def test_a_row_not_worth_keeping_leaves_by_a_copy_and_the_rows_after_it_answer_as_alone(make_tiny_model, monkeypatch):
    """With keep_finished, an ended row swaps slots with the row that takes its place only when its keys
    will be kept; one under MIN_SHARED positions is overwritten by a plain copy (`_move`) instead."""
    model = make_tiny_model("llama", seed=9)
    prompts = [list(range(3, 23)), [5, 6, 7], list(range(40, 64))]
    settings = [GREEDY, SamplingSettings(max_new_tokens=2, do_sample=False), GREEDY]
    overwritten = []  # the prompt of each row `_move` copied another row over
    real_move = DecodeScheduler._move
    monkeypatch.setattr(DecodeScheduler, "_move", lambda self, source, target: overwritten.append(
        self.rows[target].request.prompt) or real_move(self, source, target))
    scheduler = DecodeScheduler(model, max_rows=4, keep_finished=True)
    groups = scheduler.run_here([[request(prompt, setting)] for prompt, setting in zip(prompts, settings)])
    answers = [group.result().response_ids[0] for group in groups]
    assert answers == [alone(model, prompt, setting) for prompt, setting in zip(prompts, settings)]
    assert overwritten and all(prompt == prompts[1] for prompt in overwritten)
    assert sorted(entry[0] for entry in scheduler.kept.values()) == sorted(
        (prompts[i] + answers[i])[:len(prompts[i]) + len(answers[i]) - 1] for i in (0, 2))


def test_conversations_served_one_at_a_time_are_all_kept_while_the_cache_may_grow(make_tiny_model, monkeypatch):
    """One row at a time needs one slot, yet each conversation's last turn is kept: the cache grows (by
    doubling) to hold the kept slots beside the rows, up to max_rows slots within max_cached_tokens; past
    that the least recently kept gives way."""
    model = make_tiny_model("llama", seed=10)
    turn = SamplingSettings(max_new_tokens=6, do_sample=False)
    firsts = [list(range(start, start + 20)) for start in (3, 30, 60)]

    def second_turns_read(scheduler, order):
        answers = [scheduler.run([request(first, turn)]).response_ids[0] for first in firsts]
        read = counting(monkeypatch)
        for index in order:
            later = firsts[index] + answers[index] + [7, 8]
            assert scheduler.run([request(later, turn)]).response_ids[0] == alone(model, later, turn)
        monkeypatch.undo()
        return [tokens for _, _, tokens in read]

    roomy = DecodeScheduler(model, max_rows=4, keep_finished=True)
    assert second_turns_read(roomy, [0, 1, 2]) == [3, 3, 3]  # every second turn reads its new tokens only
    assert roomy.decoder.keys.shape[1] == 3  # 1 slot, 2, 4; the longer second turns regrew it to what they need
    capacity = len(firsts[0]) + 6 + 2 + 6  # a second turn's prompt and answer: a slot's positions
    tight = DecodeScheduler(model, max_rows=4, keep_finished=True, max_cached_tokens=2 * capacity)
    assert second_turns_read(tight, [2, 1, 0]) == [3, 3, len(firsts[0]) + 6 + 2]  # the first gave way
    assert tight.decoder.keys.shape[1] == 2


def test_slots_to_hold_makes_room_for_the_kept_slots_no_new_row_takes_by_doubling_within_the_budget():
    kept = {slot: (list(range(slot * 30, slot * 30 + 20)), None, slot) for slot in range(3)}
    fresh = [RowRequest(list(range(200, 220)), GREEDY, [])]  # starts from no kept slot
    follows_up = [RowRequest(list(range(30, 50)) + [7], GREEDY, [])]  # the next turn of kept slot 1

    def rows(requests):
        return [Row(request, RowGroup(requests), 16, torch.device("cpu")) for request in requests]

    assert shared_prefix.slots_to_hold(1, rows(fresh), 4, kept, 10) == 4  # 1 row + 3 kept fit the 4 held
    assert shared_prefix.slots_to_hold(2, rows(fresh), 4, kept, 10) == 8  # 5 needed: double
    assert shared_prefix.slots_to_hold(2, rows(fresh), 4, kept, 6) == 6  # ... up to the room it may have
    assert shared_prefix.slots_to_hold(2, rows(follows_up), 4, kept, 10) == 4  # it takes its own kept slot
    assert shared_prefix.slots_to_hold(1, rows(fresh), 1, {}, 10) == 1  # nothing kept: the rows' own slots
    assert shared_prefix.slots_to_hold(5, rows(fresh), 2, kept, 3) == 5  # a group over the budget gets its rows
