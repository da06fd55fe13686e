"""Rows that begin with the same tokens under the same adapter read them once: the others copy the keys
and values from the row that read them (prefix sharing among the rows in the batch, as vLLM's prefix
caching does across requests).

Where it pays: `n` answers to one request, a GRPO group's answers (and, on the RL engine, their reference
and reward rows), and requests that share a long system prompt. Reading a prompt is compute-bound on a
CPU; copying a slot's positions is one memory copy for all layers.

The rules:
- Rows are kin when their adapters are the same name and their prompts start with the same MIN_SHARED
  tokens or more (`link`, at admission; the common length is fixed, as prompts are).
- A row copies from a kin that has read further than it (`borrow`), up to the common prefix and at most
  up to its prompt's last token: that one it reads itself, as a drawing row draws from its state. A row
  with `on_prompt` copies only positions before `states_from` (its observer never sees them).
- A row whose next position a kin reads in the same pass waits a pass, then copies (`waits`), when that
  saves at least half of what is left of its prompt: each shared token is then computed once, for one
  pass of latency.
- With `keep_finished` (a server's weights never change), an ended row's keys stay in its free slot
  (`keep`); a new row starts from the kept slot that shares most with it (`take_kept`): the next turn of a
  conversation reads only its new messages. A new row that starts from none moves the kept slot it lands
  on to an empty free slot, or over the least recently kept one.
The copied keys come from another pass, so a row's numbers may differ from reading alone by the rounding
of a different batch (about 1e-7), as with any chunking of a prompt.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from tunesmith.sampling.rows import Row
    from tunesmith.sampling.slot_decoder import Chunk

MIN_SHARED = 16
"""Fewer shared tokens than this are read again (vLLM shares cache blocks of 16): the chat template's
first line alone is not worth the records and copies."""


def common_length(first: list[int], second: list[int]) -> int:
    """How many leading tokens two prompts share (compared 64 at a time: system prompts run to thousands)."""
    limit, length = min(len(first), len(second)), 0
    while length < limit and first[length:length + 64] == second[length:length + 64]:
        length = min(length + 64, limit)
    while length < limit and first[length] == second[length]:
        length += 1
    return length


def link(new_rows: list[Row], live_rows: list[Row]) -> None:
    """Record, both ways, which of `new_rows` (and the `live_rows` beside them) start alike under the same
    adapter, and over how many tokens (`Row.kin`)."""
    for index, row in enumerate(new_rows):
        for other in live_rows + new_rows[:index]:
            if other.request.adapter != row.request.adapter:
                continue
            shared = common_length(row.request.prompt, other.request.prompt)
            if shared >= MIN_SHARED:
                row.kin.append((other, shared))
                other.kin.append((row, shared))


def leave(row: Row, slot_of: dict[int, int], copy: Callable[[int, int, int, int], None]) -> None:
    """`row` leaves the batch: kin still reading take what it read first (a kin waited on it: a one-token
    answer can end in the pass it reads its prompt), then it is gone from their records."""
    for other, shared in row.kin:
        _copy_read(row, other, shared, slot_of, copy)
        other.kin = [(kin, shared) for kin, shared in other.kin if kin is not row]
    row.kin = []


def copyable(row: Row) -> int:
    """How many of `row`'s leading positions may come from another row's cache."""
    request = row.request
    last = len(request.prompt) - 1  # the prompt's last token is read: its state draws the first token
    return last if request.on_prompt is None else min(last, request.states_from)


def borrow(row: Row, slot_of: dict[int, int], copy: Callable[[int, int, int, int], None]) -> None:
    """Advance `row` over what a live kin has already read, copying those positions into its slot with
    `copy(source slot, target slot, start, end)`; `slot_of` maps each row's serial to its slot."""
    for other, shared in row.kin:
        _copy_read(other, row, shared, slot_of, copy)


def _copy_read(source: Row, target: Row, shared: int, slot_of: dict[int, int],
               copy: Callable[[int, int, int, int], None]) -> None:
    """Advance `target` over the first `shared` positions that `source` has read and it has not (as far as
    `copyable` lets it), copying them from `source`'s slot to its own."""
    end = min(shared, source.length, copyable(target))
    if end > target.length:
        copy(slot_of[source.serial], slot_of[target.serial], target.length, end)
        target.length = end


def waits(row: Row, planned: list[tuple[Row, Chunk]]) -> bool:
    """Whether `row` should skip this pass because a kin reads its next position in it: when what it could
    then copy is at least what it would still read (a short shared head, such as a chat template's first
    line, is not worth a pass of latency)."""
    kin = dict((other.serial, shared) for other, shared in row.kin)
    covered = max((kin[other.serial] for other, chunk in planned
                   if other.serial in kin and chunk.start <= row.length < chunk.start + len(chunk.ids)), default=0)
    copied = min(covered, copyable(row)) - row.length
    return copied > 0 and 2 * copied >= len(row.request.prompt) - row.length


Kept = dict[int, tuple[list[int], str | None, int]]
"""Free cache slots that hold an ended row's keys: slot -> (the ids of its positions, adapter, when kept)."""

_STAMPS = itertools.count()


def worth_keeping(row: Row) -> bool:
    """Whether an ended row's keys are worth a kept slot: a row that drew its own tokens (a follower's
    stream is another row's), with at least MIN_SHARED positions."""
    return row.leader is None and row.length >= MIN_SHARED


def keep(row: Row, slot: int, kept: Kept) -> None:
    """Remember what an ended row `worth_keeping` left in its (now free) `slot`: the ids of its cached
    positions (the scheduler asks `worth_keeping` first, to choose how the row leaves its slot)."""
    kept[slot] = ((row.request.prompt + row.tokens)[:row.length], row.request.adapter, next(_STAMPS))


def slots_to_hold(rows: int, new_rows: list[Row], held: int, kept: Kept, room: int) -> int:
    """Cache slots for `rows` rows (`new_rows` among them) and, beside them, every kept slot no new row
    starts from, so a new row overwrites no kept conversation while the cache may grow (`room`: the most
    slots it may have, the scheduler's max_rows within max_cached_tokens: what a full batch would use).
    Grown by at least doubling: each growth copies the whole cache."""
    taken = {best_kept(row, kept)[0] for row in new_rows} - {None}
    needed = max(rows, min(rows + len(kept) - len(taken), room))
    return needed if needed <= held else max(needed, min(room, 2 * held))


def best_kept(row: Row, kept: Kept) -> tuple[int | None, int]:
    """(the kept slot of `row`'s adapter that shares the most with its prompt, positions it may take from
    it); (None, 0) when none shares MIN_SHARED."""
    limit, best, end = copyable(row), None, MIN_SHARED - 1
    for slot, (ids, adapter, _) in kept.items():
        shared = min(common_length(row.request.prompt, ids), limit) if adapter == row.request.adapter else 0
        if shared > end:
            best, end = slot, shared
    return best, end if best is not None else 0


def take_kept(rows: list[Row], first_slot: int, slots: int, kept: Kept, swap: Callable[[int, int, int], None]) -> None:
    """Start each of `rows` (slots first_slot, first_slot + 1, ...; the cache holds `slots`) from the kept
    slot of its adapter that shares the most with its prompt, swapped into its slot. A kept slot a row
    would overwrite moves to a free slot past the new rows: an empty one, else the least recently kept
    (when that is older), so a conversation's last turn outlives the requests that come between."""
    free = range(first_slot + len(rows), slots)
    for offset, row in enumerate(rows):
        target = first_slot + offset
        best, end = best_kept(row, kept)
        displaced = kept.pop(target, None)
        if best is not None:
            row.length = end
        else:  # nothing to start from: find the displaced keys a slot past the new rows
            best = next((slot for slot in free if slot not in kept), None)
            if best is None and displaced is not None:
                oldest = min((slot for slot in free if slot in kept), key=lambda slot: kept[slot][2], default=None)
                best = oldest if oldest is not None and kept[oldest][2] < displaced[2] else None
            if best is None or displaced is None:
                continue
        if best != target:
            swap(best, target, max(len(kept[best][0]) if best in kept else 0, len(displaced[0]) if displaced else 0))
            kept.pop(best, None)
            if displaced is not None:
                kept[best] = displaced
