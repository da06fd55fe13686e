"""Continuous batching: one thread decodes every running answer together, rows joining and leaving at
token boundaries. What `tunesmith api`, `chat` and `do_predict` generate with.

Decoding a step streams every weight of the model once; extra rows through the same weights cost little
(more so on a CPU, where a small model's step is mostly per-call overhead). So rather than answering
requests one after another, each iteration of the loop
1. admits waiting groups (one request's rows) in arrival order while rows and cache allow (`max_rows`,
   `max_cached_tokens`; an empty batch always takes the next group);
2. runs one pass (slot_decoder.py): every decoding row's last token, and the next chunks of the prompts
   being read, first come first read, at most `prefill_tokens` of them (so a long prompt never stalls
   the rows that stream); each decoding row, and each row whose prompt is now read, draws a token;
3. releases the rows that ended (stop token, max_new_tokens, their callback, a cancelled group).
Rows that start with the same tokens under one adapter read them once, and with `keep_finished` an ended
row's keys stay for the rows after it (shared_prefix.py).
Rows carry their own adapter and sampling settings (slot_decoder.py, row_sampling.py), and a row's tokens
do not depend on its neighbours: a greedy row answers as it does alone. A sampled row draws from its own
seeded generator with its own settings, so it too answers as alone, except where a batch's matmuls round
differently from one row's (logits within about 1e-7) and a draw falls that close to a token's boundary.
A model the slot decoder cannot run (not Llama-family, a 4/8-bit base) runs each group on its own through
`generate`, one after another.
"""

from __future__ import annotations

import collections
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from typing import TYPE_CHECKING, Any

import torch

from tunesmith.errors import TunesmithError
from tunesmith.sampling import cached_decoder, shared_prefix
from tunesmith.sampling.decode_weights import JoinCache
from tunesmith.sampling.fallback import run_alone
from tunesmith.sampling.generate import last_logits
from tunesmith.sampling.pass_threads import PassThreads
from tunesmith.sampling.row_sampling import RowSettings, sample_rows
from tunesmith.sampling.rows import Row, RowGroup, RowRequest, can_follow
from tunesmith.sampling.slot_decoder import Chunk, SlotDecoder

if TYPE_CHECKING:
    from transformers import PreTrainedModel


IDLE_SECONDS = 5.0  # the loop's thread ends after this long with nothing to do (the next submit restarts it)


class DecodeScheduler:
    """The decode loop over `model`, on its own thread; `submit` queues a group of rows."""

    def __init__(self, model: PreTrainedModel, max_rows: int = 16, max_cached_tokens: int = 32768,
                 prefill_tokens: int = 512, merged: str | None = None, keep_finished: bool = False) -> None:
        self.model, self.merged = model, merged  # merged: see SlotDecoder (RL folds the policy's LoRA in)
        self.keep_finished = keep_finished
        """Whether an ended row's keys stay in its free slot for later rows that start alike (the next turn of
        a chat, the next request with the same system prompt): only while the weights never change. Then
        the decoder's joined weights are kept from batch to batch too (`JoinCache`)."""
        self.joins = JoinCache() if keep_finished else None
        self.kept: shared_prefix.Kept = {}  # free slots holding an ended row's keys
        self.head = model.get_output_embeddings()
        self.device = self.head.weight.device
        self.max_rows, self.max_cached_tokens, self.prefill_tokens = max_rows, max_cached_tokens, prefill_tokens
        self.waiting: collections.deque[RowGroup] = collections.deque()
        self.calls: list[tuple[Callable[[], Any], Future]] = []
        self.wake = threading.Condition()
        self.rows: list[Row] = []  # rows[i] lives in cache slot i: decoding rows first, then reading rows
        self.decoding = 0  # how many of rows decode
        self.decoder: SlotDecoder | None = None
        self.driver: threading.Thread | None = None  # the thread running the loop: its own, or a caller's
        self.callers_drive = True
        """Whether `run_here` callers drive the loop; False where callers are many short-lived threads (the
        API's request threads: each would get an OpenMP pool of its own)."""
        self.row_settings: tuple[tuple[int, ...], RowSettings] | None = None  # of the rows drawn last, by serial
        self.pass_threads: PassThreads | None = None
        """Sets each pass's CPU threads (a server's); None: torch's setting for every pass."""

    def submit(self, requests: list[RowRequest], cancelled: threading.Event | None = None) -> RowGroup:
        """Queue a group of rows without waiting for them (`cancelled`, when given, is the group's cancel
        flag; the caller bounds how many wait, as the API's Worker does)."""
        group = self._checked(requests, cancelled)
        with self.wake:
            self.waiting.append(group)
            self._start()
            self.wake.notify()
        return group

    def run_here(self, groups: list[list[RowRequest]], on_done: Callable[[int], None] | None = None,
                 cancelled: threading.Event | None = None) -> list[RowGroup]:
        """Run these groups to their end, decoding on the calling thread unless a thread already runs the loop
        (then they join its batch); `on_done(i)` as group i ends; `cancelled` set ends them all. For callers
        that would only wait (RL rollouts, chat, do_predict). Why not a thread of the loop's own: on a CPU
        each thread that runs torch ops gets its own OpenMP pool, and once pools' threads outnumber the cores
        libgomp wakes its workers by futex instead of spinning; passes on a second thread measured 1.4x
        slower once the caller had loaded a model, 2x slower with the caller's own parallel work in between."""
        submitted = [self._checked(requests, cancelled) for requests in groups]
        for index, group in enumerate(submitted):
            if on_done is not None:
                group.future.add_done_callback(lambda _, index=index: on_done(index))
        with self.wake:
            self.waiting.extend(submitted)
            drive = self.callers_drive and (self.driver is None or not self.driver.is_alive())
            if drive:
                self.driver = threading.current_thread()
            else:
                self._start()
                self.wake.notify()
        try:
            if drive:
                self._drive(idle=0.0, until=lambda: all(group.future.done() for group in submitted))
            for group in submitted:
                group.result()  # its rows' error, if it failed
        except BaseException:
            for group in submitted:
                group.cancel()  # an interrupt (Ctrl-C in chat) leaves nothing of these decoding
            raise
        return submitted

    def serve_here(self, ready: Callable[[], None] = lambda: None) -> None:
        """Run the loop on the calling thread for good (`tunesmith api`: the thread that loaded the model, so
        one thread runs every torch op; see `run_here`); `ready()` once submits go to this thread."""
        with self.wake:
            self.driver = threading.current_thread()
        ready()
        self._drive(idle=None)

    def _checked(self, requests: list[RowRequest], cancelled: threading.Event | None = None) -> RowGroup:
        """A group of `requests`, once they are known to be a group the loop can run."""
        if not requests:
            raise TunesmithError("a group needs at least one row.")
        if len(requests) > self.max_rows:
            raise TunesmithError(f"{len(requests)} answers at once exceed the {self.max_rows} rows the decoder "
                                 "runs together (max_num_seqs); ask for fewer.")
        if any(not request.prompt for request in requests):
            raise TunesmithError("every answer needs a prompt of at least one token.")
        if any(request.follows is not None and not can_follow(request, index, requests)
               for index, request in enumerate(requests)):
            raise TunesmithError("a follower must follow an earlier row of its group that draws its own tokens, "
                                 "with the same prompt and at most as many new tokens (its cache room).")
        return RowGroup(requests, cancelled)

    def run(self, requests: list[RowRequest]) -> Any:
        """The rows' `Generation`, decoded on the calling thread if no other runs the loop (`run_here`)."""
        return self.run_here([requests])[0].result()

    def call(self, work: Callable[[], Any]) -> Any:
        """Run `work` on the decode thread between steps (other work on the same model, e.g. scoring)."""
        future: Future = Future()
        with self.wake:
            self.calls.append((work, future))
            self._start()
            self.wake.notify()
        return future.result()

    def _start(self) -> None:
        """Under the lock: a thread for the loop, unless one runs it (its own, or a caller's in run_here)."""
        if self.driver is None or not self.driver.is_alive():
            self.driver = threading.Thread(target=self._drive, args=(IDLE_SECONDS,), name="tunesmith-decode",
                                           daemon=True)
            self.driver.start()

    def _drive(self, idle: float | None, until: Callable[[], bool] | None = None) -> None:
        """The loop, on the driver thread: admit, then one pass, until nothing has come for `idle` seconds
        (None: for good) or `until()` (a caller's own groups have ended). Ending is decided under the lock;
        work left then (other callers', or after an interrupt) goes on on a thread of the loop's own."""
        try:
            while True:
                with self.wake:
                    if until is not None and until():
                        return
                    if not self.wake.wait_for(lambda: self.waiting or self.rows or self.calls, timeout=idle):
                        return
                    calls, self.calls = self.calls, []
                    admitted = self._admit()
                for work, future in calls:
                    _settle(future, work)
                if isinstance(admitted, RowGroup):  # a model the slot decoder cannot run: this group alone
                    _settle(admitted.future, lambda group=admitted: run_alone(self.model, group))
                    continue
                try:
                    with torch.no_grad():
                        self._iterate()
                except BaseException as err:  # noqa: B036 - every running request must learn why; the loop lives
                    self._fail(err)
        finally:
            with self.wake:
                if self.driver is threading.current_thread():
                    self.driver = None  # so an engine nobody uses can be freed; the next submit starts anew
                    if self.waiting or self.rows or self.calls:
                        self._start()

    def _admit(self) -> RowGroup | None:
        """Move waiting groups into the batch, in arrival order, while they fit; returns a group to run
        alone (see module). A group whose rows cannot be set up (memory) gets the error, not the loop."""
        for group in [g for g in self.waiting if g.cancelled.is_set() or g.future.done()]:
            self.waiting.remove(group)  # a client gone while waiting frees its place at once
            group.future.cancel()
        while self.waiting:
            group = self.waiting[0]
            capacity = max(r.reserved for r in group.requests) + 1
            if not self.rows:
                if not cached_decoder.supports(self.model, capacity):
                    return self.waiting.popleft()
            elif not (self._fits(group, capacity) and cached_decoder.supports(self.model, capacity)):
                return None
            self.waiting.popleft()
            try:
                self._place(group, capacity)
            except BaseException as err:  # noqa: B036 - this group learns why; the others go on
                if not group.future.done():
                    group.future.set_exception(err)
        return None

    def _fits(self, group: RowGroup, capacity: int) -> bool:
        """Whether the running batch has rows and cache room for `group`: the cache it needs is slots x the
        longest row's positions (one bigger only because an earlier, longer row left it so does not count)."""
        slots = len(self.rows) + len(group.requests)
        needed = max([capacity] + [row.request.reserved + 1 for row in self.rows])
        return slots <= self.max_rows and slots * needed <= self.max_cached_tokens

    def _place(self, group: RowGroup, capacity: int) -> None:
        """Give each row of `group` a slot after the running rows (they read their prompt first)."""
        if group.future.set_running_or_notify_cancel() is False:
            return
        slots = len(self.rows) + len(group.requests)
        capacity = max([capacity] + [row.request.reserved + 1 for row in self.rows])
        vocab = self.head.weight.shape[0]
        rows = [Row(request, group, vocab, self.device) for request in group.requests]
        for row in rows:
            if row.request.follows is not None:
                row.leader = rows[row.request.follows]
        if not self.rows:  # a fresh batch reads the weights as they are now (adapters added, training)
            budget = max(self.max_cached_tokens, slots * capacity)
            if self.decoder is not None and (self.decoder.holds(slots, capacity, self.max_cached_tokens) or (
                    self.kept and self.decoder.positions <= budget)):  # kept slots: grow it rather than start anew
                self.decoder.read_weights(self.model)
            else:  # none yet, or the one a wider or longer batch left: a cache this batch's size
                self.decoder, self.kept = None, {}
                self.decoder = SlotDecoder(self.model, slots, capacity, self.merged, self.joins)
        room = self.max_cached_tokens // capacity
        live = max(len(self.rows), min(1 + max(self.kept, default=-1), room))
        # kept slots may fill what a full batch would: up to max_rows slots, within max_cached_tokens
        held = shared_prefix.slots_to_hold(slots, rows, self.decoder.keys.shape[1], self.kept, min(room, self.max_rows))
        if self.decoder.grow(max(slots, live, held), capacity, live):  # kept slots past `live` are now zeros
            self.kept = {slot: (entry[0][:capacity], *entry[1:]) for slot, entry in self.kept.items() if slot < live}
        shared_prefix.take_kept(rows, len(self.rows), self.decoder.keys.shape[1], self.kept, self.decoder.swap)
        shared_prefix.link(rows, self.rows)
        group.rows = rows
        self.rows.extend(rows)

    def _iterate(self) -> None:
        """One pass: every decoding row's next token, and the next chunks of the prompts being read."""
        for row in self.rows:
            if row.group.cancelled.is_set():
                row.end()
        self._release()
        if not self.rows:
            return
        decoding = self.rows[:self.decoding]
        chunks, readers = self._chunks()
        tokens = len(decoding) + sum(len(chunk.ids) for chunk in chunks)
        threads = None if self.pass_threads is None else self.pass_threads.set_for(tokens)
        started = time.perf_counter()
        fed = [row.tokens[-1] if row.leader is None else row.stream()[row.length] for row in decoding]
        states = self.decoder.forward(
            torch.tensor(fed, dtype=torch.long, device=self.device),
            torch.tensor([row.length for row in decoding], dtype=torch.long, device=self.device),
            chunks, [row.request.adapter for row in decoding + readers])
        drawing, last = [], []
        for index, row in enumerate(decoding):
            if row.leader is None:
                drawing.append(row)
                last.append(index)
            else:
                row.read(states[index:index + 1], row.length)
            row.length += 1
        at, decoded = len(decoding), len(drawing)
        for row, chunk in zip(readers, chunks):
            row.read(states[at:at + len(chunk.ids)], row.length)
            row.length += len(chunk.ids)
            at += len(chunk.ids)
            if row.leader is None and not row.prefilling and not row.done:
                drawing.append(row)
                last.append(at - 1)
        self._draw(drawing, states[torch.tensor(last, dtype=torch.long, device=self.device)])
        for row in drawing[decoded:]:  # prompt read: the row decodes from the next pass on
            self._swap(self.rows.index(row), self.decoding)
            self.decoding += 1
        self._place_followers()
        self._release()
        if threads is not None and decoding and not chunks:  # a prompt's chunk would weigh on one side
            self.pass_threads.record(threads, time.perf_counter() - started, len(decoding))

    def _chunks(self) -> tuple[list[Chunk], list[Row]]:
        """The pass's chunks to read, first come first read within `prefill_tokens`: the rest of a prompt,
        or what a follower outside the decoding rows has not read yet; and the rows they belong to. What a
        row shares with rows beside it is copied or waited for, not read again (shared_prefix.py)."""
        chunks, readers, budget = [], [], self.prefill_tokens
        slot_of = {row.serial: slot for slot, row in enumerate(self.rows)}
        for slot in sorted(range(self.decoding, len(self.rows)), key=lambda slot: self.rows[slot].serial):
            row = self.rows[slot]
            shared_prefix.borrow(row, slot_of, self.decoder.copy)
            if budget <= 0 or shared_prefix.waits(row, list(zip(readers, chunks))):
                continue
            if row.leader is None:
                ids = row.request.prompt[row.length:row.length + budget]
            else:
                ids = row.stream()[row.length:row.length + budget]
            if ids:
                chunks.append(Chunk(slot, row.length, ids))
                readers.append(row)
                budget -= len(ids)
        return chunks, readers

    def _place_followers(self) -> None:
        """A follower with exactly one token to read decodes (one token a pass, batched with the decoding
        rows); one with more, or none yet, reads chunks; one that has read its whole stream ends."""
        for row in [row for row in self.rows if row.leader is not None and not row.done]:
            pending = row.pending()
            slot = self.rows.index(row)
            if row.leader.done and (pending == 0 or row.diverged):
                row.end()
            elif pending == 1 and slot >= self.decoding and row.request.in_step:
                self._swap(slot, self.decoding)
                self.decoding += 1
            elif pending != 1 and slot < self.decoding:
                self._swap(slot, self.decoding - 1)
                self.decoding -= 1

    def _draw(self, rows: list[Row], hidden: torch.Tensor) -> None:
        """Each row's next token from its final hidden state [rows, hidden]."""
        if not rows:
            return
        logits = last_logits(self.head, hidden)  # [rows, vocab] float32
        key = tuple(row.serial for row in rows)
        if self.row_settings is None or self.row_settings[0] != key:  # the batch changed: new settings
            self.row_settings = key, RowSettings.of([row.request.settings for row in rows], self.device)
        settings = self.row_settings[1]
        seen = torch.stack([row.seen if row.seen is not None else logits.new_zeros(logits.shape[1], dtype=torch.bool)
                            for row in rows]) if settings.penalised else None
        tokens = sample_rows(logits, settings, [row.generator for row in rows], seen).tolist()
        for index, row in enumerate(rows):
            if not row.done:  # a row whose request failed on a row before it in this loop
                row.accept(tokens[index], logits[index], hidden[index])

    def _release(self) -> None:
        """Take ended rows out of the batch, keeping decoding rows first and the slots contiguous."""
        while True:
            ended = next((index for index, row in enumerate(self.rows) if row.done), None)
            if ended is None:
                break
            shared_prefix.leave(self.rows[ended], {row.serial: slot for slot, row in enumerate(self.rows)},
                                self.decoder.copy)
            # swap where its keys will be kept: they go along to the free slot; else a copy of the other row will do
            keeps = self.keep_finished and shared_prefix.worth_keeping(self.rows[ended])
            move = self._swap if keeps else self._move
            if ended < self.decoding:
                move(self.decoding - 1, ended)
                ended = self.decoding - 1
                self.decoding -= 1
            move(len(self.rows) - 1, ended)
            row = self.rows.pop()
            if keeps:
                shared_prefix.keep(row, len(self.rows), self.kept)
            row.group.finish_if_done()

    def _move(self, source: int, target: int) -> None:
        """Row `source` takes slot `target` (whose row is leaving: it goes to `source`'s place)."""
        if source != target:
            self.decoder.copy(source, target, 0, self.rows[source].length)
            self.rows[source], self.rows[target] = self.rows[target], self.rows[source]

    def _swap(self, first: int, second: int) -> None:
        if first != second:
            self.decoder.swap(first, second, max(self.rows[first].length, self.rows[second].length))
            self.rows[first], self.rows[second] = self.rows[second], self.rows[first]

    def _fail(self, error: BaseException) -> None:
        """A step failed: every running group gets the error, and the batch starts over."""
        for row in self.rows:
            if not row.group.future.done():
                row.group.future.set_exception(error)
        self.rows, self.decoding, self.decoder, self.kept = [], 0, None, {}  # the next batch: a fresh cache


def _settle(future: Future, work: Callable[[], Any]) -> None:
    """Run `work`, its result or exception into `future`."""
    if future.done() or (not future.running() and not future.set_running_or_notify_cancel()):
        return
    try:
        future.set_result(work())
    except BaseException as err:  # noqa: B036 - the caller must learn why, the loop must live
        future.set_exception(err)
