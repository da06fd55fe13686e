"""The decode scheduler: rows of different requests, adapters and sampling settings decoded together,
joining and leaving at any step, each answering exactly as it does alone through `generate` (a separate
code path: CachedDecoder or transformers' forward, one request at a time)."""

import gc
import threading
import time

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from tests.sampling.test_cached_decoder import with_lora
from tunesmith.config import SamplingSettings
from tunesmith.errors import TunesmithError
from tunesmith.model.lora import lora_modules, side_adapter
from tunesmith.sampling.generate import filter_logits, generate
from tunesmith.sampling.row_sampling import RowSettings, filter_rows, sample_rows
from tunesmith.sampling.rows import RowRequest
from tunesmith.sampling.scheduler import DecodeScheduler
from tunesmith.sampling.slot_decoder import BASE, OWN

STOP = [1]
GREEDY = SamplingSettings(max_new_tokens=12, do_sample=False)
SAMPLED = [SamplingSettings(max_new_tokens=12, temperature=1.3),
           SamplingSettings(max_new_tokens=9, temperature=0.7, top_k=20),
           SamplingSettings(max_new_tokens=12, temperature=1.0, top_p=0.8, repetition_penalty=1.3),
           SamplingSettings(max_new_tokens=7, do_sample=False, repetition_penalty=1.5)]


def prompts(count, seed=0, longest=40):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(2, 128, (int(n),), generator=generator).tolist()
            for n in torch.randint(1, longest, (count,), generator=generator)]


def with_side_sets(model, names=("kind", "terse")):
    """LoRA on every projection (own weights random) plus side adapter sets of other ranks."""
    with_lora(model)
    torch.manual_seed(7)
    for _, layer in lora_modules(model):
        for rank, name in enumerate(names, start=2):
            layer.side[name] = (torch.randn(rank, layer.base_layer.in_features) * 0.3,
                                torch.randn(layer.base_layer.out_features, rank) * 0.3, 0.5)
    return model


def alone(model, prompt, settings, adapter=None, seed=None):
    """What `generate` answers for this one row: the reference each scheduled row must equal."""
    generator = [torch.Generator().manual_seed(seed)] if seed is not None else None
    with _adapter(model, adapter):
        return generate(model, [prompt], settings, STOP, 0, generator=generator).response_ids[0]


def _adapter(model, adapter):
    if adapter == BASE:
        layers = [layer for _, layer in lora_modules(model)]
        return _disabled(layers)
    if adapter in (None, OWN):
        return torch.no_grad()
    return side_adapter(model, adapter)


class _disabled:
    def __init__(self, layers):
        self.layers = layers

    def __enter__(self):
        for layer in self.layers:
            layer.disabled = True

    def __exit__(self, *exc):
        for layer in self.layers:
            layer.disabled = False


def request(prompt, settings, adapter=None, seed=None, **callbacks):
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    return RowRequest(prompt, settings, STOP, generator, adapter, **callbacks)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_mixed_adapters_and_settings_in_one_batch_answer_as_alone(make_tiny_model, arch):
    model = with_side_sets(make_tiny_model(arch, seed=3))
    adapters = [None, "kind", "terse", BASE, OWN, "kind"]
    rows = [(prompt, SAMPLED[i % len(SAMPLED)] if i % 3 else GREEDY, adapters[i % len(adapters)], 100 + i)
            for i, prompt in enumerate(prompts(12))]
    expected = [alone(model, *row) for row in rows]
    scheduler = DecodeScheduler(model, max_rows=8, prefill_tokens=24)
    groups = [scheduler.submit([request(*row)]) for row in rows]
    assert [group.result(timeout=60).response_ids[0] for group in groups] == expected
    assert len({tuple(answer) for answer in expected}) > 6  # the rows really differ


def test_rows_join_while_others_decode_and_long_prompts_are_read_in_chunks(make_tiny_model):
    model = make_tiny_model("llama", seed=1)
    long_settings = SamplingSettings(max_new_tokens=60, do_sample=False)
    first, later = prompts(1, seed=1)[0], prompts(3, seed=2, longest=120)
    started = threading.Event()
    seen_rows = []
    scheduler = DecodeScheduler(model, max_rows=4, prefill_tokens=16)

    def on_token(token):
        seen_rows.append(len(scheduler.rows))
        if len(seen_rows) == 5:
            started.set()

    running = scheduler.submit([request(first, long_settings, on_token=on_token)])
    assert started.wait(30)
    joined = [scheduler.submit([request(prompt, GREEDY)]) for prompt in later]
    assert running.result(timeout=60).response_ids[0] == alone(model, first, long_settings)
    assert [g.result(timeout=60).response_ids[0] for g in joined] == [alone(model, p, GREEDY) for p in later]
    assert max(seen_rows) > 1  # the later rows ran beside the first


def test_prompt_states_come_out_in_chunks_equal_to_one_forward(make_tiny_model):
    model = make_tiny_model("qwen2", seed=2)
    prompt = prompts(1, seed=5, longest=2)[0] * 0 + list(range(2, 90))
    chunks = []
    DecodeScheduler(model, prefill_tokens=16).run([request(prompt, GREEDY, on_prompt=lambda s, at: chunks.append((at, s)))])
    assert [at for at, _ in chunks] == list(range(0, len(prompt), 16))
    states = torch.cat([s for _, s in chunks])
    with torch.no_grad():
        expected = model.model(torch.tensor([prompt])).last_hidden_state[0]
    torch.testing.assert_close(states, expected, atol=1e-5, rtol=1e-4)


def test_rows_and_cache_stay_within_bounds(make_tiny_model):
    model = make_tiny_model("llama", seed=4)
    scheduler = DecodeScheduler(model, max_rows=2, max_cached_tokens=200, prefill_tokens=16)
    held = []

    def watch(token):
        keys = scheduler.decoder.keys
        held.append((len(scheduler.rows), keys.shape[1] * keys.shape[3]))

    rows = prompts(6, seed=3)
    groups = [scheduler.submit([request(p, GREEDY, on_token=watch)]) for p in rows]
    assert [g.result(timeout=60).response_ids[0] for g in groups] == [alone(model, p, GREEDY) for p in rows]
    assert max(r for r, _ in held) == 2
    big = max(len(p) for p in rows) + GREEDY.max_new_tokens + 16
    assert all(cached <= max(200, big) for _, cached in held)


def test_a_cancelled_group_ends_and_frees_its_rows(make_tiny_model):
    model = make_tiny_model("llama", seed=5)
    endless = SamplingSettings(max_new_tokens=400, do_sample=False)
    scheduler = DecodeScheduler(model)
    counted = []
    cancelled = threading.Event()
    group = scheduler.submit([request([5, 6, 7], endless, on_token=counted.append)] * 2, cancelled)
    while len(counted) < 6:
        time.sleep(0.005)
    cancelled.set()
    answers = group.result(timeout=30).response_ids
    assert all(len(answer) < 400 for answer in answers)
    other = prompts(1, seed=9)[0]
    assert scheduler.run([request(other, GREEDY)]).response_ids[0] == alone(model, other, GREEDY)
    assert not scheduler.rows


def test_a_failing_callback_fails_its_own_request_only(make_tiny_model):
    model = make_tiny_model("llama", seed=6)
    scheduler = DecodeScheduler(model)
    long = SamplingSettings(max_new_tokens=40, do_sample=False)
    beside = scheduler.submit([request([5, 6, 7], long)])
    failing = scheduler.submit([request([3, 4], GREEDY, on_token=lambda token: 1 / 0)])
    with pytest.raises(ZeroDivisionError):
        failing.result(timeout=30)
    assert beside.result(timeout=30).response_ids[0] == alone(model, [5, 6, 7], long)
    assert scheduler.run([request([3, 4], GREEDY)]).response_ids[0] == alone(model, [3, 4], GREEDY)


def test_a_group_that_cannot_be_set_up_gets_the_error_and_the_loop_lives(make_tiny_model):
    model = make_tiny_model("llama", seed=6)
    scheduler = DecodeScheduler(model)
    with pytest.raises(RuntimeError):  # a cache of 2**40 positions cannot be allocated
        scheduler.submit([request([3, 4], SamplingSettings(max_new_tokens=2**40, do_sample=False))]).result(timeout=30)
    assert scheduler.run([request([3, 4], GREEDY)]).response_ids[0] == alone(model, [3, 4], GREEDY)
    with pytest.raises(TunesmithError, match="prompt"):
        scheduler.submit([request([], GREEDY)])


def test_sampled_rows_never_take_the_settings_of_rows_gone_before(make_tiny_model):
    """Rows come and go between steps; each step must sample with the rows' own settings (a cache keyed by
    object identity once handed a new row the settings of a freed one)."""
    model = make_tiny_model("llama", seed=8)
    scheduler = DecodeScheduler(model)
    sampled = SamplingSettings(max_new_tokens=10, temperature=1.5)
    expected = alone(model, [9, 10, 11], sampled, seed=5)
    for _ in range(12):
        scheduler.run([request([9, 10, 11], GREEDY)])
        gc.collect()  # the greedy row's memory is free for the next row to reuse
        assert scheduler.run([request([9, 10, 11], sampled, seed=5)]).response_ids[0] == expected


def test_rows_batch_again_after_a_long_answer_alone(make_tiny_model):
    model = make_tiny_model("llama", seed=9)
    scheduler = DecodeScheduler(model, max_rows=4, max_cached_tokens=4 * 60)
    scheduler.run([request(list(range(2, 120)), SamplingSettings(max_new_tokens=50, do_sample=False))])
    together = []
    rows = prompts(4, seed=11, longest=20)
    groups = [scheduler.submit([request(p, GREEDY, on_token=lambda t: together.append(len(scheduler.rows)))])
              for p in rows]
    assert [g.result(timeout=60).response_ids[0] for g in groups] == [alone(model, p, GREEDY) for p in rows]
    assert max(together) > 1


def test_a_model_the_slot_decoder_cannot_run_answers_through_generate(monkeypatch):
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=128)).eval()
    rows = prompts(3, seed=4)
    scheduler = DecodeScheduler(model)
    groups = [scheduler.submit([request(p, SAMPLED[0], seed=i)]) for i, p in enumerate(rows)]
    expected = [alone(model, p, SAMPLED[0], seed=i) for i, p in enumerate(rows)]
    assert [g.result(timeout=60).response_ids[0] for g in groups] == expected


def test_filter_rows_equals_filter_logits_row_by_row():
    torch.manual_seed(0)
    logits = torch.randn(5, 50) * 3
    top_k, top_p = torch.tensor([0, 5, 50, 3, 0]), torch.tensor([1.0, 0.9, 0.5, 1.0, 0.3])
    got = filter_rows(logits, top_k, top_p)
    for row in range(5):
        expected = filter_logits(logits[row:row + 1], int(top_k[row]), float(top_p[row]))
        assert torch.equal(got[row:row + 1], expected)


def test_sample_rows_draws_each_row_from_its_own_generator():
    torch.manual_seed(1)
    logits = torch.randn(3, 40)
    settings = [SAMPLED[0], GREEDY, SAMPLED[1]]
    row_settings = RowSettings.of(settings, torch.device("cpu"))
    tokens = sample_rows(logits.clone(), row_settings, [torch.Generator().manual_seed(i) for i in range(3)])
    assert int(tokens[1]) == int(logits[1].argmax())
    for row in (0, 2):  # drawn alone, with the same generator, the same token
        alone_tokens = sample_rows(logits[row:row + 1].clone(), RowSettings.of([settings[row]], torch.device("cpu")),
                                   [torch.Generator().manual_seed(row)])
        assert int(alone_tokens[0]) == int(tokens[row])


def test_an_idle_loop_ends_so_an_unused_engine_can_be_freed(make_tiny_model, monkeypatch):
    import weakref

    from tunesmith.sampling import scheduler as scheduler_module

    monkeypatch.setattr(scheduler_module, "IDLE_SECONDS", 0.05)
    model = make_tiny_model("llama", seed=2)
    scheduler = DecodeScheduler(model)
    first = scheduler.submit([request([3, 4], GREEDY)]).result().response_ids
    deadline = time.monotonic() + 10
    while scheduler.driver is not None:
        assert time.monotonic() < deadline, "the idle loop did not end"
        time.sleep(0.01)
    assert scheduler.submit([request([3, 4], GREEDY)]).result().response_ids == first  # a new thread takes over
    while scheduler.driver is not None:
        time.sleep(0.01)
    gone = weakref.ref(scheduler)
    del scheduler
    gc.collect()
    assert gone() is None


def test_the_cache_never_outgrows_max_cached_tokens_for_a_batch(make_tiny_model):
    """Seven rows end at once, one runs on, and a long request joins it: the cache is sized for the two
    rows running (2 x 500), not for the eight slots the earlier batch left (8 x 500)."""
    model = make_tiny_model("llama", seed=2)
    scheduler = DecodeScheduler(model, max_rows=8, max_cached_tokens=1000)
    held = []

    def watch(token):
        held.append(scheduler.decoder.keys.shape[1] * scheduler.decoder.keys.shape[3])

    prompt = list(range(2, 12))
    first = scheduler.submit([request(prompt, SamplingSettings(max_new_tokens=1, do_sample=False))] * 7 +
                             [request(prompt, SamplingSettings(max_new_tokens=90, do_sample=False), on_token=watch)])
    long = SamplingSettings(max_new_tokens=490, do_sample=False)
    second = scheduler.submit([request(prompt, long, on_token=watch)])
    first.result(timeout=60)
    assert second.result(timeout=120).response_ids[0] == alone(model, prompt, long)
    assert max(held) <= 1000


def test_a_failed_cache_allocation_leaves_the_running_rows_whole(make_tiny_model, monkeypatch):
    """Growing the cache fails on its second buffer (out of memory): that request gets the error, the row
    running beside it and the next request answer as alone (the cache was not left half grown)."""
    model = make_tiny_model("llama", seed=2)
    scheduler = DecodeScheduler(model, max_cached_tokens=100000)
    started, go = threading.Event(), threading.Event()

    def hold(token):
        started.set()
        go.wait(5)

    running = scheduler.submit([request([5, 6, 7], SamplingSettings(max_new_tokens=30, do_sample=False),
                                        on_token=hold)])
    assert started.wait(10)
    real, made = torch.Tensor.new_zeros, []

    def second_fails(self, *shape, **kwargs):
        if len(shape) == 5:  # the cache's keys, then its values
            made.append(shape)
            if len(made) == 2:
                raise torch.OutOfMemoryError("simulated: no memory for the values")
        return real(self, *shape, **kwargs)

    monkeypatch.setattr(torch.Tensor, "new_zeros", second_fails)
    grows = scheduler.submit([request([5, 6, 7], SamplingSettings(max_new_tokens=200, do_sample=False))])
    after = scheduler.submit([request([8, 9], GREEDY)])
    go.set()
    with pytest.raises(torch.OutOfMemoryError):
        grows.result(timeout=30)
    monkeypatch.undo()
    assert running.result(timeout=30).response_ids[0] == alone(model, [5, 6, 7],
                                                              SamplingSettings(max_new_tokens=30, do_sample=False))
    assert after.result(timeout=30).response_ids[0] == alone(model, [8, 9], GREEDY)


def test_work_queued_as_the_idle_loop_times_out_is_still_run(make_tiny_model, monkeypatch):
    from tunesmith.sampling import scheduler as scheduler_module
    from tunesmith.sampling.rows import RowGroup

    monkeypatch.setattr(scheduler_module, "IDLE_SECONDS", 0.2)
    model = make_tiny_model("llama", seed=3)
    scheduler = DecodeScheduler(model)
    expected = scheduler.submit([request([3, 4], GREEDY)]).result().response_ids
    with scheduler.wake:  # submit's critical section, held across the loop's idle timeout
        time.sleep(0.4)
        group = RowGroup([request([3, 4], GREEDY)])
        scheduler.waiting.append(group)
        scheduler._start()
        scheduler.wake.notify()
    assert group.result(timeout=10).response_ids == expected


def test_callers_that_wait_decode_on_their_own_thread_and_join_a_running_loop(make_tiny_model):
    """run_here: the first caller drives the loop; a second caller meanwhile, or one while the loop's own
    thread serves submits, joins that batch; every answer is what it is alone."""
    model = make_tiny_model("llama", seed=6)
    rows = [(prompt, GREEDY) for prompt in prompts(6, seed=9)]
    expected = [alone(model, *row) for row in rows]
    scheduler = DecodeScheduler(model, max_rows=4)
    drivers, answers = [], {}

    def caller(index):
        def on_token(token):
            drivers.append(scheduler.driver)
        group = scheduler.run_here([[request(*rows[index], on_token=on_token)]])[0]
        answers[index] = group.result().response_ids[0]

    threads = [threading.Thread(target=caller, args=(i,)) for i in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    background = scheduler.submit([request(*rows[3], on_token=lambda token: time.sleep(0.01))])
    joined = scheduler.run_here([[request(*row)] for row in rows[4:]])
    assert [answers[i] for i in range(3)] + [background.result(timeout=30).response_ids[0]] + [
        group.result().response_ids[0] for group in joined] == expected
    # a caller's thread drove them (once its own answer ended, the rest went on on the loop's own thread)
    assert None not in drivers and set(drivers) & set(threads)


def test_an_interrupt_while_a_caller_drives_ends_its_rows_and_the_next_run_is_whole(make_tiny_model):
    model = make_tiny_model("llama", seed=6)
    scheduler = DecodeScheduler(model)

    def interrupt(token):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        scheduler.run([request([5, 6, 7], GREEDY, on_token=interrupt)])
    assert not scheduler.rows and scheduler.driver is None
    assert scheduler.run([request([5, 6, 7], GREEDY)]).response_ids[0] == alone(model, [5, 6, 7], GREEDY)


def test_a_caller_that_stops_driving_hands_the_rows_left_to_a_thread_of_the_loops_own(make_tiny_model):
    """Caller A drives; B joins A's batch; an interrupt lands in A's loop outside a pass (here in admission):
    B's rows still finish, on a thread the scheduler starts."""
    model = make_tiny_model("llama", seed=3)
    scheduler = DecodeScheduler(model, max_rows=4)
    admit, armed, joined = scheduler._admit, threading.Event(), threading.Event()

    def interrupted_admit():
        if armed.is_set() and threading.current_thread() is threading.main_thread():
            armed.clear()
            raise KeyboardInterrupt
        return admit()

    scheduler._admit = interrupted_admit
    answers = {}

    def caller_b():
        joined.set()
        group = scheduler.run_here([[request([8, 9], SamplingSettings(max_new_tokens=60, do_sample=False))]])[0]
        answers["b"] = group.result().response_ids[0]

    def on_token(token):  # A's second token: B joins, then the interrupt is armed
        if not joined.is_set():
            threading.Thread(target=caller_b, daemon=True).start()
            while not scheduler.waiting and "b" not in answers:
                time.sleep(0.001)
            armed.set()

    with pytest.raises(KeyboardInterrupt):
        scheduler.run_here([[request([5, 6, 7], SamplingSettings(max_new_tokens=400, do_sample=False),
                                     on_token=on_token)]])
    deadline = time.monotonic() + 30
    while "b" not in answers:
        assert time.monotonic() < deadline, "B's rows were left with no thread to run them"
        time.sleep(0.01)
    assert answers["b"] == alone(model, [8, 9], SamplingSettings(max_new_tokens=60, do_sample=False))
