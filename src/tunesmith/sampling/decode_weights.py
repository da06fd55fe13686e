"""A lean decoder's weights as it computes with them: each projection's weight, bias and unmerged adapter
(`Projection`), q/k/v joined into one product, weights cast once to autocast's dtype, and packed into the
GEMM's own layout for a generation's row count (`pack_layer`, `packing_fits`). `CachedDecoder` reads a
model into these; the slot decoder reads its own, per-row-adapter kind.
"""

from __future__ import annotations

import copy
import weakref
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import nn

from tunesmith.algorithms.linear import PackedLinear, environment_choice, linear, packed_linear
from tunesmith.model.fast_linear import is_plain_linear
from tunesmith.model.lora import LoRALinear, few_row_linear, lora_update


@dataclass
class Projection:
    """y = x W^T + b (+ scaling * (x A^T) B^T for an adapter that is not merged); `weight` and `bias` as
    an `nn.Linear` has them, so `generate.last_logits` takes one for the output head."""

    weight: torch.Tensor
    bias: torch.Tensor | None
    lora: tuple[torch.Tensor, torch.Tensor, float] | None
    packed: PackedLinear | None = None
    """The weight in the GEMM's own layout for the rows a generation decodes (`packed`), if that pays."""

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed is not None and self.packed.takes(x):
            out = self.packed(x)
        else:
            out = few_row_linear(x, self.weight, self.bias)
        if self.lora is not None:
            lora_A, lora_B, scaling = self.lora
            out = out + lora_update(x, lora_A, lora_B, scaling).to(out.dtype)
        return out


class JoinedProjection:
    """Several projections of one input side by side where one has an unmerged adapter (a bf16 base, a side
    adapter): one matmul on the joined base weights, one on every adapter's A, then each B on its share of
    the low-rank activations, added to its share of the output: 5 matmuls for q/k/v rather than 9 (bf16
    sampling of 4 x 64 tokens of the 40M model, LoRA on every layer: 0.64-0.69 s against 0.69-0.78 s)."""

    def __init__(self, parts: list[Projection]) -> None:
        self.base = join_projections([Projection(part.weight, part.bias, None) for part in parts])
        self.widths = [part.weight.shape[0] for part in parts]  # not the parts: their weights are in `base`
        self.loras = [part.lora for part in parts]
        self.lora_A = torch.cat([lora[0] for lora in self.loras if lora is not None])  # [sum of ranks, in]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        low = linear(x.to(self.lora_A.dtype), self.lora_A)  # [..., sum of ranks]
        column = rank = 0
        for width, lora in zip(self.widths, self.loras):
            if lora is not None:
                _, lora_B, scaling = lora
                update = linear(low[..., rank:rank + lora_B.shape[1]] * scaling, lora_B)
                out[..., column:column + width] += update.to(out.dtype)
                rank += lora_B.shape[1]
            column += width
        return out


class PairedProjection:
    """Gate and up (`LayerWeights.gate_up`) as two projections of one input, each on its own weight.
    CachedDecoder's MLP: joining would copy gate and up for each generation beside the packed copy it
    already makes (0.84 GB more for Qwen2-0.5B in float32, held through an RL rollout), where the two
    products cost about what one does."""

    def __init__(self, first: Projection, second: Projection) -> None:
        self.first, self.second = first, second

    def gated(self, act: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """act(gate(x)) * up(x), from the two products as they come (not joined, then split)."""
        return act(self.first(x)) * self.second(x)


class JoinCache:
    """Joined weights kept while their parts live unchanged, for a long-lived decode scheduler (a server's):
    every batch that starts on an idle server reads the weights anew, and joining q/k/v and gate/up copies
    most of the model (0.8 GB for Qwen2-0.5B in float32), which its first request would wait for. A part
    changed in place (an optimizer step, `copy_`) has a new version, a new tensor (a merged adapter's weight)
    another identity: both join afresh. Not for RL's rollouts: the copy would outlive them into the update."""

    def __init__(self) -> None:
        self.entries: dict[tuple[int, ...], tuple[list[weakref.ref], tuple, torch.Tensor]] = {}

    def cat(self, weights: list[torch.Tensor]) -> torch.Tensor:
        """torch.cat(weights), the one made before where they are the same tensors, unchanged (same version,
        storage, dtype and device: `module.to` and `.data =` swap a parameter's data without a new version;
        only an in-place change through `.data` would go unseen, and a served model's weights have none)."""
        key = tuple(id(weight) for weight in weights)
        versions = tuple((weight._version, weight.data_ptr(), weight.dtype, weight.device) for weight in weights)
        held = self.entries.get(key)
        if held is not None and held[1] == versions and all(ref() is w for ref, w in zip(held[0], weights)):
            return held[2]
        self.entries = {k: entry for k, entry in self.entries.items() if all(ref() is not None for ref in entry[0])}
        joined = torch.cat(weights)
        self.entries[key] = ([weakref.ref(weight) for weight in weights], versions, joined)
        return joined


def join_projections(parts: list[Projection]) -> Projection | JoinedProjection:
    """q, k and v as one matmul on the concatenated weights: decoding streams each weight once per token,
    and one [q+k+v, hidden] matmul both saves two calls and runs the small k/v weights at full speed."""
    if any(part.lora is not None for part in parts):
        return JoinedProjection(parts)
    biases = [part.bias for part in parts]
    bias = None if all(b is None for b in biases) else torch.cat(
        [b if b is not None else part.weight.new_zeros(part.weight.shape[0]) for b, part in zip(biases, parts)])
    return Projection(torch.cat([part.weight for part in parts]), bias, None)


def module_projection(module: nn.Module) -> Projection | None:
    """The weights `module` computes with right now, or None when its state is one this decoder skips."""
    if isinstance(module, LoRALinear):
        base = module.base_layer
        if not is_plain_linear(base):  # a 4/8-bit base: only bitsandbytes' own layer can compute with it
            return None
        if module.active_side is not None:  # a side adapter (or, where it has no update here, the base)
            return Projection(base.weight, base.bias, module.side.get(module.active_side))
        if module.inference_weight is not None and not module.disabled:
            return Projection(module.inference_weight, base.bias, None)
        if module.disabled or module.merged:
            return Projection(base.weight, base.bias, None)
        if not isinstance(module.lora_dropout, nn.Identity) and module.training:
            return None
        return Projection(base.weight, base.bias, (module.lora_A.weight, module.lora_B.weight, module.scaling))
    if is_plain_linear(module):
        return Projection(module.weight, module.bias, None)
    return None


@dataclass
class LayerWeights:
    """One decoder block as a lean decoder runs it; the projections are that decoder's own callables
    (here `Projection`/`JoinedProjection`; slot_decoder's take the rows' adapter groups too)."""

    input_norm: tuple[torch.Tensor, float]
    """RMSNorm (weight, eps)."""
    qkv: Callable
    o: Callable
    post_norm: tuple[torch.Tensor, float]
    gate_up: Callable
    """The MLP's gate and up projections: in the slot decoder one product on their joined weights,
    [..., 2 x intermediate], gate's half first (`gated` takes them apart); in CachedDecoder a
    `PairedProjection`, two products (its `gated`)."""
    down: Callable
    act: nn.Module


def gated(act: nn.Module, gate_up: torch.Tensor) -> torch.Tensor:
    """act(gate) * up, from gate and up joined (`LayerWeights.gate_up`)."""
    gate, up = gate_up.chunk(2, dim=-1)
    return act(gate) * up


def cast_head(head: nn.Module, dtype: torch.dtype | None, rows: int | None = None) -> nn.Module | Projection:
    """The output head for `generate.last_logits`, its weight cast once to `dtype` (see `cast_projection`)
    and, with `rows`, packed for that many (`packed`): with a large vocabulary it is the biggest weight a
    decode step reads."""
    if (dtype is None or head.weight.dtype == dtype) and rows is None:
        return head
    return packed(cast_projection(Projection(head.weight, head.bias, None), dtype), rows)


def packed(projection: Projection, rows: int | None) -> Projection:
    """`projection` with its weight in the GEMM's own layout for products of `rows` rows where that pays
    (`algorithms.linear.packed_linear`: decoding streams every weight once per token, and a packed weight
    streams 1.4-1.7x faster in float32 and 1.5x in bfloat16 on a Sapphire Rapids core); else as it is."""
    if rows is None:
        return projection
    return replace(projection, packed=packed_linear(projection.weight, projection.bias, rows))


PACK_VARIABLE = "TUNESMITH_PACK"
"""Environment variable: `on` packs decoding's weights whatever the memory, `off` never, `auto` (the default)
where the copy fits (`packing_fits`). Packed float32 products round differently from plain ones (about 1e-6),
so separate runs that must sample alike fix it, and TUNESMITH_GEMM (which fixes the packing library too)."""


def packing_fits(model: nn.Module) -> bool:
    """Whether to pack `model`'s weights for a generation (a CPU model's; elsewhere nothing packs): where the
    copy takes at most a quarter of the memory available now, or as TUNESMITH_PACK says. Packing trades a
    copy of the weights, for one generation, for speed; it must not push a large model's rollout into swap."""
    if model.get_output_embeddings().weight.device.type != "cpu":
        return False
    wanted = environment_choice(PACK_VARIABLE, ("on", "off"),
                                "pack where a copy of the weights fits in a quarter of free memory")
    if wanted in ("on", "off"):
        return wanted == "on"
    size = sum(p.numel() * p.element_size() for p in model.parameters())
    return size <= available_memory() / 4


def available_memory() -> float:
    """Bytes a new allocation may take: Linux's MemAvailable, or less where a container's memory limit
    (cgroup v2 or v1) leaves less; 0 where neither can be read (then nothing is packed)."""
    free = [_meminfo_available()]
    for limit, usage in (("memory.max", "memory.current"), ("memory/memory.limit_in_bytes", "memory/memory.usage_in_bytes")):
        try:
            cap = Path("/sys/fs/cgroup", limit).read_text().strip()
            if cap != "max":
                free.append(float(cap) - float(Path("/sys/fs/cgroup", usage).read_text()))
        except (OSError, ValueError):
            continue
    known = [value for value in free if value is not None]
    return max(0.0, min(known)) if known else 0.0


def _meminfo_available() -> float | None:
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return float(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return None


def pack_layer(layer: LayerWeights, rows: int) -> LayerWeights:
    """A block's base projections packed for `rows` rows (see `packed`); adapters' low-rank pairs stay."""
    return replace(layer, qkv=_packed_joined(layer.qkv, rows), o=packed(layer.o, rows),
                   gate_up=_packed_joined(layer.gate_up, rows), down=packed(layer.down, rows))


def _packed_joined(projection: Projection | JoinedProjection | PairedProjection,
                   rows: int) -> Projection | JoinedProjection | PairedProjection:
    if isinstance(projection, PairedProjection):
        return PairedProjection(packed(projection.first, rows), packed(projection.second, rows))
    if isinstance(projection, JoinedProjection):
        projection = copy.copy(projection)
        projection.base = packed(projection.base, rows)
        return projection
    return packed(projection, rows)


def cast_projection(projection: Projection, dtype: torch.dtype | None) -> Projection:
    """`projection` with its weights (and an unmerged adapter's) in `dtype` (None: as they are). Under
    autocast every matmul casts an fp32 weight to the autocast dtype, each call: once per token for every
    weight of the model, where decoding's cost is reading the weights. Cast once per decoder instead: the
    same bf16 products (summed in another order, and a bias added in bf16 as autocast's linear adds it)."""
    if dtype is None:
        return projection

    def cast(tensor: torch.Tensor | None) -> torch.Tensor | None:
        return None if tensor is None else tensor.to(dtype)

    lora = projection.lora
    return Projection(cast(projection.weight), cast(projection.bias),
                       None if lora is None else (cast(lora[0]), cast(lora[1]), lora[2]))
