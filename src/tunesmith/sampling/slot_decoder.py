"""The decode scheduler's forward: a Llama-family model over a KV cache with one slot per row, where every
row has its own length and its own LoRA adapter (or none).

`CachedDecoder` decodes rows that start together (left-padded, one shared cache column per step). Here
rows join and leave at any step, so each slot keeps its own columns 0..length-1 with no padding, a step
writes each row's key at its own column, and attention masks each row to its own length. The scheduler
keeps the rows that decode in slots 0..D-1 and the rows still reading their prompt after them, so a pass's
decoding rows attend over one contiguous slice of the cache in one batched product, and each prompt chunk
over its own slot (moving a slot when a row leaves costs one copy of its keys). A pass packs the decoding
rows' tokens and every chunk's into one [tokens, hidden] batch for the weights' matmuls, with no padding.

Per-row adapters, as S-LoRA and Punica batch them: the base matmul runs once for every row, and each
group of rows that share an adapter adds its low-rank update, h = W x + B_a (A_a x) for rows of adapter a.
The adapters are the layer's side sets (`served_adapters`, a LoRA reward model beside the policy), the
layer's own LoRA (`OWN`), and None: whatever the layer's forward runs now, so a row of adapter None
computes what the model does. A row whose adapter a layer lacks (`BASE`) runs that layer's base (adapter
off: the reference model of RL). Adapters merged into the weights (a chat model: merge_adapters) are part
of the base for every row.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from tunesmith.algorithms.linear import linear
from tunesmith.model.lora import LoRALinear, few_row_linear
from tunesmith.sampling.cached_decoder import rms_norm, rms_norm_weights, rope_qkv
from tunesmith.sampling.decode_weights import JoinCache, LayerWeights, gated

if TYPE_CHECKING:
    from transformers import PreTrainedModel

STATIC_ROPE = ("default", "linear", "llama3", "yarn")
"""RoPE variants whose cos/sin depend on the position alone (transformers' dynamic and longrope ones also
depend on the length seen so far)."""
OWN = "\0own"
"""The adapter name of a LoRA layer's own (trainable) weights, beside its side sets."""
BASE = "\0base"
"""An adapter name no layer holds: rows of it run the base weights alone."""

Groups = list[tuple[str | None, torch.Tensor | None]]
"""(adapter, rows) for each adapter some row uses; rows None means every row of the pass."""


@dataclass
class _Projection:
    """y = x W^T + b, plus B_a A_a x for each row of adapter a (B pre-scaled)."""

    weight: torch.Tensor
    bias: torch.Tensor | None
    adapters: dict[str | None, tuple[torch.Tensor, torch.Tensor]]
    folded: str | None = None
    """The adapter folded into `weight` (`_projection`'s `merged`), if any."""
    fallback: tuple[torch.Tensor, torch.Tensor] | None = None
    """With an adapter folded in: the pair that takes a row of an adapter this layer lacks back to the base."""

    def pair(self, name: str | None) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The low-rank pair rows of adapter `name` add (None: nothing to add)."""
        if name in self.adapters:
            return self.adapters[name]
        return None if name is None or name == self.folded else self.fallback

    def __call__(self, x: torch.Tensor, groups: Groups) -> torch.Tensor:
        out = few_row_linear(x, self.weight, self.bias)  # [rows, length, out]
        for name, rows in groups:
            pair = self.pair(name)
            if pair is None:
                continue
            lora_A, lora_B = pair
            part = x if rows is None else x[rows]
            update = linear(linear(part.to(lora_A.dtype), lora_A), lora_B).to(out.dtype)
            if rows is None:
                out += update
            else:
                out.index_add_(0, rows, update)
        return out


def _projection(module: nn.Module, merged: str | None = None) -> _Projection:
    """The base weight of a Linear or LoRA layer with every adapter it holds (only for `supports`ed models):
    its side sets by name, its own LoRA as OWN, and under None whatever its forward adds right now. With
    `merged` (fp32 weights only: in bf16, round(W + B A) - B A would not give back W), that adapter is
    folded into a copy of the weight and every other adapter, and BASE, adds its difference from it, so
    rows of `merged` run one matmul."""
    if not isinstance(module, LoRALinear):
        return _Projection(module.weight, module.bias, {})
    base = module.base_layer  # its own LoRA runs as a low-rank update even inside merged_for_inference
    adapters = {name: (lora_A, lora_B * scaling) for name, (lora_A, lora_B, scaling) in module.side.items()}
    if not (module.merged or module.disabled):
        adapters[OWN] = (module.lora_A.weight, module.lora_B.weight * module.scaling)
    current = module.active_side if module.active_side is not None else OWN
    if merged not in adapters or base.weight.dtype != torch.float32:
        if current in adapters:
            adapters[None] = adapters[current]
        return _Projection(base.weight, base.bias, adapters)
    folded_A, folded_B = adapters.pop(merged)
    undo = (folded_A, -folded_B)
    adapters = {name: (torch.cat([lora_A, folded_A]), torch.cat([lora_B, -folded_B], dim=1))
                for name, (lora_A, lora_B) in adapters.items()}
    if current != merged:
        adapters[None] = adapters.get(current, undo)
    return _Projection(base.weight + folded_B @ folded_A, base.bias, adapters, merged, undo)


def _joined(parts: list[_Projection], joins: JoinCache | None) -> _Projection:
    """Projections of one input (q, k and v; gate and up) as one: one matmul over the stacked base weights (a
    copy of them, held while a batch runs, or by a server's `joins`), and per adapter one low-rank pair, A
    stacked over the parts that add something for it and B block-diagonal, so the update is each part's own."""
    biases = [part.bias for part in parts]
    bias = None if all(b is None for b in biases) else torch.cat(
        [b if b is not None else part.weight.new_zeros(part.weight.shape[0]) for b, part in zip(biases, parts)])
    outs = [part.weight.shape[0] for part in parts]

    def stacked(pairs: list[tuple[int, tuple[torch.Tensor, torch.Tensor]]]) -> tuple[torch.Tensor, torch.Tensor]:
        lora_A = torch.cat([a for _, (a, _) in pairs])
        lora_B = lora_A.new_zeros(sum(outs), lora_A.shape[0])
        rank_at = 0
        for index, (a, b) in pairs:
            row_at = sum(outs[:index])
            lora_B[row_at:row_at + outs[index], rank_at:rank_at + a.shape[0]] = b
            rank_at += a.shape[0]
        return lora_A, lora_B

    adapters = {}
    for name in dict.fromkeys(name for part in parts for name in part.adapters):
        adapters[name] = stacked([(i, pair) for i, part in enumerate(parts) if (pair := part.pair(name)) is not None])
    fallbacks = [(i, part.fallback) for i, part in enumerate(parts) if part.fallback is not None]
    folded = next((part.folded for part in parts if part.folded is not None), None)
    weights = [part.weight for part in parts]
    return _Projection(torch.cat(weights) if joins is None else joins.cat(weights), bias, adapters, folded,
                       stacked(fallbacks) if fallbacks else None)


def _read_layer(block: nn.Module, merged: str | None, joins: JoinCache | None) -> LayerWeights:
    attention, mlp = block.self_attn, block.mlp
    q, k, v, o, gate, up, down = (_projection(m, merged) for m in (attention.q_proj, attention.k_proj, attention.v_proj,
                                                          attention.o_proj, mlp.gate_proj, mlp.up_proj, mlp.down_proj))
    return LayerWeights(rms_norm_weights(block.input_layernorm), _joined([q, k, v], joins), o,
                        rms_norm_weights(block.post_attention_layernorm), _joined([gate, up], joins), down, mlp.act_fn)


def adapter_groups(adapters: list[str | None], device: torch.device) -> Groups:
    """The `Groups` of rows whose adapters are `adapters` (None: the weights as the model runs them now)."""
    names = list(dict.fromkeys(adapters))
    if len(names) == 1:
        return [(names[0], None)]
    return [(name, torch.tensor([i for i, a in enumerate(adapters) if a == name], device=device)) for name in names]


@dataclass
class Chunk:
    """Part of a row's prompt read in a pass: its slot, the position of its first token, the token ids."""

    slot: int
    start: int
    ids: list[int]


class SlotDecoder:
    """Keys and values for `slots` rows of up to `capacity` positions each, and the pass that fills them."""

    def __init__(self, model: PreTrainedModel, slots: int, capacity: int, merged: str | None = None,
                 joins: JoinCache | None = None) -> None:
        config = model.config
        self.merged = merged
        """The adapter folded into the weights while a batch runs (`_projection`): RL's policy rows."""
        self.joins = joins
        """Keeps the joined weights from batch to batch (a long-lived scheduler's); None: joined for each."""
        self.read_weights(model)
        self.heads = config.num_attention_heads
        self.kv_heads = getattr(config, "num_key_value_heads", None) or self.heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.heads
        self.scale = self.head_dim ** -0.5
        weight = self.embed.weight
        # zeros, not empty: masked positions get no weight, but 0 x NaN is still NaN
        shape = (len(self.layers), slots, self.kv_heads, capacity, self.head_dim)
        self.keys = torch.zeros(shape, dtype=weight.dtype, device=weight.device)
        self.values = torch.zeros(shape, dtype=weight.dtype, device=weight.device)

    @torch.no_grad()  # copies (joined, folded) to decode with, not parts of a graph
    def read_weights(self, model: PreTrainedModel) -> None:
        """Take the model's weights and adapters as they are now (a new batch after training or loading)."""
        decoder = model.get_decoder()
        self.embed, self.rotary = decoder.embed_tokens, decoder.rotary_emb
        self.rope_table: tuple[torch.Tensor, torch.Tensor] | None = None  # cos, sin [positions, head_dim]
        self.norm = rms_norm_weights(decoder.norm)
        self.layers = [_read_layer(block, self.merged, self.joins) for block in decoder.layers]

    def holds(self, slots: int, capacity: int, budget: int) -> bool:
        """Whether the cache fits `slots` rows of `capacity` positions without exceeding `budget` positions
        by more than those rows need (then a new batch reuses it rather than allocating afresh)."""
        _, held_slots, _, held_capacity, _ = self.keys.shape
        return (slots <= held_slots and capacity <= held_capacity
                and held_slots * held_capacity <= max(budget, slots * capacity))

    def grow(self, slots: int, capacity: int, live: int) -> bool:
        """Hold `slots` rows of `capacity` positions (no more: the cache's size is the admission's bound),
        keeping the first `live` slots (the rest are zeros); both buffers are made before either replaces
        the old one. Whether it made new ones."""
        _, held_slots, _, held_capacity, _ = self.keys.shape
        if slots <= held_slots and capacity <= held_capacity:
            return False
        kept = min(held_capacity, capacity)
        new = [old.new_zeros(old.shape[0], slots, old.shape[2], capacity, old.shape[4])
               for old in (self.keys, self.values)]
        for fresh, old in zip(new, (self.keys, self.values)):
            fresh[:, :live, :, :kept] = old[:, :live, :, :kept]
        self.keys, self.values = new
        return True

    @property
    def positions(self) -> int:
        """The cache's size: slots x positions each."""
        return self.keys.shape[1] * self.keys.shape[3]

    def copy(self, source: int, target: int, start: int, end: int) -> None:
        """Copy slot `source`'s positions start..end-1 to slot `target` (a row changing slots, or taking a
        prefix another row has read)."""
        self.keys[:, target, :, start:end] = self.keys[:, source, :, start:end]
        self.values[:, target, :, start:end] = self.values[:, source, :, start:end]

    def swap(self, first: int, second: int, length: int) -> None:
        """Exchange two slots' first `length` positions."""
        for cache in (self.keys, self.values):
            held = cache[:, first, :, :length].clone()
            cache[:, first, :, :length] = cache[:, second, :, :length]
            cache[:, second, :, :length] = held

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor, chunks: list[Chunk],
                adapters: list[str | None]) -> torch.Tensor:
        """Final hidden states [decoding rows + chunk tokens, hidden] of one pass: rows 0..D-1 (slots 0..D-1)
        each fed `tokens[i]` [D] at `positions[i]`, then every chunk's tokens, packed without padding (the
        weights' matmuls see one [tokens, hidden] batch; attention runs per chunk). `adapters` names each
        decoding row's adapter, then each chunk's."""
        device = self.embed.weight.device
        decoding = tokens.shape[0]
        ids, where = tokens, positions
        if chunks:
            ids = torch.cat([tokens, torch.tensor([t for c in chunks for t in c.ids], dtype=torch.long, device=device)])
            where = torch.cat([positions, torch.tensor([c.start + i for c in chunks for i in range(len(c.ids))],
                                                       dtype=torch.long, device=device)])
        per_token = adapters[:decoding] + [a for c, a in zip(chunks, adapters[decoding:]) for _ in c.ids]
        groups = adapter_groups(per_token, device)
        layout = self._decode_layout(positions) if decoding else None  # what every layer's decode attention shares
        hidden = self.embed(ids)[:, None]  # [tokens, 1, hidden]: each token a row of one position
        cos, sin = self._rotation(hidden, where)  # [tokens, 1, 1, head_dim]
        for index, layer in enumerate(self.layers):
            x = rms_norm(hidden, layer.input_norm)
            qkv = layer.qkv(x, groups).view(-1, 1, self.heads + 2 * self.kv_heads, self.head_dim).transpose(1, 2)
            q, k, v = rope_qkv(qkv, self.heads, self.kv_heads, cos, sin)  # [tokens, heads, 1, head_dim] each
            parts = []
            if decoding:
                parts.append(self._decode_attention(index, q[:decoding], k[:decoding], v[:decoding], layout))
            parts += self._chunk_attention(index, q[decoding:], k[decoding:], v[decoding:], chunks)
            attended = parts[0] if len(parts) == 1 else torch.cat(parts)
            hidden = hidden + layer.o(attended, groups)
            x = rms_norm(hidden, layer.post_norm)
            hidden = hidden + layer.down(gated(layer.act, layer.gate_up(x, groups)), groups)
        return rms_norm(hidden, self.norm)[:, 0]

    def _rotation(self, hidden: torch.Tensor, where: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """RoPE's cos and sin [tokens, 1, 1, head_dim] at positions `where` [tokens]: rows of a table the model's
        own module made once for every position of the cache, where its variant depends on the position alone
        (the same values: each is one product inv_freq x position, then cos/sin); else that module, per pass."""
        if getattr(self.rotary, "rope_type", "default") not in STATIC_ROPE:
            cos, sin = self.rotary(hidden, where[:, None])
            return cos[:, None], sin[:, None]
        capacity, table = self.keys.shape[3], self.rope_table
        if table is None or table[0].shape[0] < capacity or table[0].dtype != hidden.dtype:
            positions = torch.arange(capacity, device=where.device)[None]
            self.rope_table = tuple(part[0] for part in self.rotary(hidden[:1, 0][None], positions))
        cos, sin = self.rope_table
        return cos[where][:, None, None], sin[where][:, None, None]

    def _decode_layout(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """For decoding rows 0..D-1 at `positions` [D]: where each row's new key goes in a layer's cache seen as
        [slots x kv heads x capacity, head_dim] ([D x kv heads]), and the additive mask of the keys past each
        row's position ([D x kv heads, 1, keys]: 0, or -inf)."""
        rows, device, capacity = positions.shape[0], positions.device, self.keys.shape[3]
        heads = torch.arange(self.kv_heads, device=device)
        flat = ((torch.arange(rows, device=device)[:, None] * self.kv_heads + heads) * capacity + positions[:, None])
        end = int(positions.max()) + 1
        bias = torch.zeros(rows, 1, end, dtype=self.keys.dtype, device=device).masked_fill_(
            torch.arange(end, device=device) > positions[:, None, None], float("-inf"))
        return flat.view(-1), bias.repeat_interleave(self.kv_heads, dim=0)

    def _decode_attention(self, index: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                          layout: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """[rows, 1, heads * head_dim]: rows 0..D-1 each write their key at their own position and attend
        to their own cache up to it (`_decode_layout`), each kv head's group of queries as the rows of one
        product, so grouped-query attention runs on the cache as stored, its keys read in place (baddbmm, which
        would fold the scale and the mask into the product, ran 1.2x slower than these three ops)."""
        rows, heads, _, head_dim = q.shape
        flat, bias = layout
        end = bias.shape[-1]
        keys, values = self.keys[index], self.values[index]  # [slots, kv heads, capacity, head_dim]
        keys.view(-1, head_dim).index_copy_(0, flat, k.reshape(-1, head_dim).to(keys.dtype))
        values.view(-1, head_dim).index_copy_(0, flat, v.reshape(-1, head_dim).to(values.dtype))
        group = q.reshape(rows * self.kv_heads, heads // self.kv_heads, head_dim)
        scores = torch.bmm(group, keys[:rows, :, :end].flatten(0, 1).transpose(1, 2)).mul_(self.scale).add_(bias)
        attended = torch.bmm(scores.softmax(dim=-1), values[:rows, :, :end].flatten(0, 1))  # [rows x kv, group, dim]
        return attended.view(rows, 1, heads * head_dim)

    def _chunk_attention(self, index: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                         chunks: list[Chunk]) -> list[torch.Tensor]:
        """[chunk tokens, 1, heads * head_dim] per chunk: its keys go to its slot, its queries attend
        causally to the slot's earlier positions and to each other."""
        out, at = [], 0
        for chunk in chunks:
            count, end = len(chunk.ids), chunk.start + len(chunk.ids)
            keys, values = self.keys[index, chunk.slot], self.values[index, chunk.slot]  # [kv heads, capacity, dim]
            keys[:, chunk.start:end] = k[at:at + count, :, 0].transpose(0, 1).to(keys.dtype)
            values[:, chunk.start:end] = v[at:at + count, :, 0].transpose(0, 1).to(values.dtype)
            query = q[at:at + count, :, 0].transpose(0, 1)[None]  # [1, heads, count, dim]
            causal = torch.arange(end, device=q.device) <= torch.arange(chunk.start, end, device=q.device)[:, None]
            attended = F.scaled_dot_product_attention(query, keys[None, :, :end], values[None, :, :end],
                                                      attn_mask=causal, scale=self.scale,
                                                      enable_gqa=self.kv_heads != self.heads)
            out.append(attended[0].transpose(0, 1).reshape(count, 1, -1))
            at += count
        return out
