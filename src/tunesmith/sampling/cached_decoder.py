"""A hand-written Llama-family forward with a preallocated KV cache: the sampler's inner loop.

Decoding a small model on a CPU is dominated by per-token overhead, not arithmetic: transformers' forward
rebuilds the attention mask, concatenates each layer's cache and dispatches every Linear through its
wrapper, every token. This decoder reads the weights once (a LoRA layer contributes its merged weight
when `merged_for_inference` set one, else its base weight plus the low-rank path: its own, or the active
side adapter's), keeps keys and values in buffers sized for the whole generation, and runs one position
per row per step with plain tensor ops. Under autocast (bf16 sampling, a bf16 run's rollouts) it holds
the projections cast to autocast's dtype, once, where autocast would cast every weight at every token.

On a GPU a decode step of a small model is bound by kernel launches (hundreds per token), not by the
GPU: there each step after the first replays a CUDA graph of the whole forward, which attends over the
full cache buffer with a mask so every step has the same shapes.

It covers the architectures whose layers are exactly: RMSNorm, q/k/v/o projections (optionally biased),
rotary embeddings from the model's own `rotary_emb` (so scaled RoPE variants come along), grouped-query
attention, RMSNorm, gate/up/down MLP with the model's activation. `supports(model)` says whether a
model qualifies; `generate` falls back to transformers' forward for anything else. Its outputs equal
transformers' within float rounding (tested on Llama and Qwen2, with padding and with LoRA).
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from tunesmith.algorithms.linear import PackedLinear, linear, packed_linear
from tunesmith.model.fast_linear import is_plain_linear
from tunesmith.model.lora import LoRALinear, few_row_linear, lora_update

if TYPE_CHECKING:
    from transformers import PreTrainedModel

SUPPORTED_TYPES = ("llama", "qwen2", "mistral")


@dataclass
class Projection:
    """y = x W^T + b (+ scaling * (x A^T) B^T for an adapter that is not merged); `weight` and `bias` as
    an `nn.Linear` has them, so `generate.last_logits` takes one for the output head."""

    weight: torch.Tensor
    bias: torch.Tensor | None
    lora: tuple[torch.Tensor, torch.Tensor, float] | None
    packed: PackedLinear | None = None
    """The weight in the GEMM's own layout for the rows a generation decodes (`pack`), if that pays."""

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed is not None and self.packed.takes(x):
            out = self.packed(x)
        else:
            out = few_row_linear(x, self.weight, self.bias)
        if self.lora is not None:
            lora_A, lora_B, scaling = self.lora
            out = out + lora_update(x, lora_A, lora_B, scaling).to(out.dtype)
        return out


class _Joined:
    """Several projections of one input side by side where one has an unmerged adapter (a bf16 base, a side
    adapter): one matmul on the joined base weights, one on every adapter's A, then each B on its share of
    the low-rank activations, added to its share of the output: 5 matmuls for q/k/v rather than 9 (bf16
    sampling of 4 x 64 tokens of the 40M model, LoRA on every layer: 0.64-0.69 s against 0.69-0.78 s)."""

    def __init__(self, parts: list[Projection]) -> None:
        self.base = _joined([Projection(part.weight, part.bias, None) for part in parts])
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


def _joined(parts: list[Projection]) -> Projection | _Joined:
    """q, k and v as one matmul on the concatenated weights: decoding streams each weight once per token,
    and one [q+k+v, hidden] matmul both saves two calls and runs the small k/v weights at full speed."""
    if any(part.lora is not None for part in parts):
        return _Joined(parts)
    biases = [part.bias for part in parts]
    bias = None if all(b is None for b in biases) else torch.cat(
        [b if b is not None else part.weight.new_zeros(part.weight.shape[0]) for b, part in zip(biases, parts)])
    return Projection(torch.cat([part.weight for part in parts]), bias, None)


def _projection(module: nn.Module) -> Projection | None:
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
    (here `Projection`/`_Joined`; slot_decoder's take the rows' adapter groups too)."""

    input_norm: tuple[torch.Tensor, float]
    """RMSNorm (weight, eps)."""
    qkv: Callable
    o: Callable
    post_norm: tuple[torch.Tensor, float]
    gate: Callable
    up: Callable
    down: Callable
    act: nn.Module


def supports(model: PreTrainedModel, length: int) -> bool:
    """Whether `CachedDecoder` can run `model`, as it is configured now, over `length` positions."""
    config = model.config
    if getattr(config, "model_type", None) not in SUPPORTED_TYPES:
        return False
    window = getattr(config, "sliding_window", None)  # Mistral's default 4096; Qwen2 sets it only when used
    if window is not None and length > window:
        return False
    if getattr(config, "use_sliding_window", False) or any(t != "full_attention" for t in getattr(config, "layer_types", None) or ()):
        return False
    decoder = model.get_decoder()
    if not hasattr(decoder, "rotary_emb") or rms_norm_weights(decoder.norm) is None:
        return False
    return all(layer_parts(block) is not None for block in decoder.layers)


def layer_parts(block: nn.Module) -> tuple[list[tuple[torch.Tensor, float]], list[Projection]] | None:
    """(norms, projections q/k/v/o/gate/up/down) of a decoder block, or None when one is of a kind this
    decoder does not run; cheap, so `supports` can ask without building the fused q/k/v weights."""
    attention, mlp = block.self_attn, block.mlp
    if getattr(attention, "sliding_window", None):
        return None
    projections = [_projection(m) for m in (attention.q_proj, attention.k_proj, attention.v_proj, attention.o_proj,
                                            mlp.gate_proj, mlp.up_proj, mlp.down_proj)]
    norms = [rms_norm_weights(m) for m in (block.input_layernorm, block.post_attention_layernorm)]
    if any(part is None for part in projections + norms):
        return None
    return norms, projections


def _read_layer(block: nn.Module, dtype: torch.dtype | None = None) -> LayerWeights:
    """A decoder block's weights as this decoder runs them, q/k/v fused, the projections cast to `dtype`
    when given; only for blocks `supports` accepted."""
    (input_norm, post_norm), projections = layer_parts(block)
    q, k, v, o, gate, up, down = [cast_projection(part, dtype) for part in projections]
    return LayerWeights(input_norm, _joined([q, k, v]), o, post_norm, gate, up, down, block.mlp.act_fn)


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


def packing_fits(model: nn.Module) -> bool:
    """Whether a packed copy of `model`'s weights (a CPU model's; elsewhere nothing packs) takes at most a
    quarter of the memory available now: packing trades a copy of the weights, for one generation, for
    speed, and must not push a large model's rollout into swap."""
    weight = model.get_output_embeddings().weight
    if weight.device.type != "cpu":
        return False
    size = sum(p.numel() * p.element_size() for p in model.parameters())
    return size <= available_memory() / 4


def available_memory() -> float:
    """Bytes of memory available to a new allocation (Linux's MemAvailable; inf where unknown)."""
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return float(line.split()[1]) * 1024
    except OSError:
        pass
    return float("inf")


def pack_layer(layer: LayerWeights, rows: int) -> LayerWeights:
    """A block's base projections packed for `rows` rows (see `packed`); adapters' low-rank pairs stay."""
    qkv = layer.qkv
    if isinstance(qkv, _Joined):
        qkv.base = packed(qkv.base, rows)
    else:
        qkv = packed(qkv, rows)
    return replace(layer, qkv=qkv, o=packed(layer.o, rows), gate=packed(layer.gate, rows), up=packed(layer.up, rows),
                   down=packed(layer.down, rows))


def autocast_matmul_dtype(device: torch.device) -> torch.dtype | None:
    """The dtype autocast runs matmuls in on `device` right now (bf16 sampling, a bf16 run's rollouts);
    None when it is off."""
    return torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type) else None


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


def rms_norm_weights(module: nn.Module) -> tuple[torch.Tensor, float] | None:
    """(weight, eps) of a Llama-style RMSNorm (weight * x / rms(x)), None for any other norm."""
    eps = getattr(module, "variance_epsilon", None)
    weight = getattr(module, "weight", None)
    if eps is None or weight is None or type(module).__name__ not in ("LlamaRMSNorm", "Qwen2RMSNorm", "MistralRMSNorm"):
        return None
    return weight, eps


def rms_norm(x: torch.Tensor, norm: tuple[torch.Tensor, float]) -> torch.Tensor:
    """transformers' order of operations: normalise in fp32, cast back, then scale. By torch's fused kernel
    (one op for the seven written out: 12 against 60 us for 4 decoded rows of 512, 17 norms per token)."""
    weight, eps = norm
    if x.dtype == weight.dtype == torch.float32:
        return F.rms_norm(x, weight.shape, weight, eps)
    return weight * F.rms_norm(x.float(), x.shape[-1:], None, eps).to(x.dtype)


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE in transformers' half-split layout: x cos + rotate_half(x) sin."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


class CachedDecoder:
    """Prefill a batch of left-padded prompts, then decode one token per row per `step`."""

    def __init__(self, model: PreTrainedModel, rows: int, max_len: int, decode_rows: int | None = None) -> None:
        """`decode_rows`: pack the weights for steps of that many rows (`pack_layer`); None keeps them as is."""
        decoder = model.get_decoder()
        config = model.config
        self.embed = decoder.embed_tokens
        self.norm = rms_norm_weights(decoder.norm)
        self.rotary = decoder.rotary_emb
        self.compute_dtype = autocast_matmul_dtype(decoder.embed_tokens.weight.device)
        self.layers = [_read_layer(block, self.compute_dtype) for block in decoder.layers]
        if decode_rows is not None:
            self.layers = [pack_layer(layer, decode_rows) for layer in self.layers]
        self.heads = config.num_attention_heads
        self.kv_heads = getattr(config, "num_key_value_heads", None) or self.heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.heads
        self.scale = self.head_dim ** -0.5
        weight = self.embed.weight
        self.graph = _GraphedStep() if _can_graph(self.rotary, weight.device) else None
        shape = (len(self.layers), rows, self.kv_heads, max_len, self.head_dim)
        # a graphed step attends over every column (masked): unused ones must hold numbers, not garbage
        make = torch.zeros if self.graph is not None else torch.empty
        self.keys = make(shape, dtype=weight.dtype, device=weight.device)
        self.values = make(shape, dtype=weight.dtype, device=weight.device)
        # additive attention bias per cache column: 0 for a real key, -inf for a pad or an unused column
        self.key_bias = torch.full((rows, max_len), float("-inf"), dtype=weight.dtype, device=weight.device)
        self.length = 0  # columns of the cache in use

    def prefill(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """[rows, length, hidden] final hidden states of every position (the prompts are left-padded)."""
        rows, length = input_ids.shape
        self.key_bias[:, :length].masked_fill_(attention_mask.bool(), 0.0)
        causal = torch.ones(length, length, dtype=torch.bool, device=input_ids.device).tril()
        # a padded query row would see no key at all (softmax of nothing is NaN): let it see itself
        mask = (causal & attention_mask.bool()[:, None, None, :]) | torch.eye(length, dtype=torch.bool,
                                                                               device=input_ids.device)
        hidden = self._forward(input_ids, positions, mask, 0)
        self.length = length
        return hidden

    def step(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """[rows, hidden] final hidden state after feeding `tokens` [rows] at `positions` [rows, 1]."""
        column = self.length
        if self.graph is not None:
            hidden = self.graph(self, tokens, positions, column)
            if hidden is not None:
                self.length = column + 1
                return hidden
            self.graph = None  # capture failed (the warning says why): decode eagerly from here on
        self.key_bias[:, column] = 0.0
        hidden = self._forward(tokens[:, None], positions, self.key_bias[:, None, None, :column + 1], column)
        self.length = column + 1
        return hidden[:, -1]

    def repeat_interleave(self, times: int) -> None:
        """Repeat every row `times` times in place of it (GRPO's group shares one prefill)."""
        if self.graph is not None:
            self.graph = _GraphedStep()  # a captured graph would read the old buffers
        self.keys = self.keys.repeat_interleave(times, dim=1)
        self.values = self.values.repeat_interleave(times, dim=1)
        self.key_bias = self.key_bias.repeat_interleave(times, dim=0)

    def _forward(self, input_ids: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor,
                 start: int | torch.Tensor) -> torch.Tensor:
        """Final hidden states [rows, length, hidden]; keys and values go to the cache from column `start`,
        an int, or for the graphed step a one-element tensor (then attention spans the whole buffer)."""
        rows, length = input_ids.shape
        hidden = self.embed(input_ids)  # [rows, length, hidden]
        cos, sin = self.rotary(hidden, positions)
        cos, sin = cos[:, None], sin[:, None]  # [rows, 1, length, head_dim]
        end = start + length if isinstance(start, int) else self.keys.shape[3]
        for index, layer in enumerate(self.layers):
            x = rms_norm(hidden, layer.input_norm)
            qkv = layer.qkv(x).view(rows, length, -1, self.head_dim).transpose(1, 2)  # [rows, heads, length, dim]
            # RoPE on q and k together (one call, not two)
            q, k = rope(qkv[:, :self.heads + self.kv_heads], cos, sin).split([self.heads, self.kv_heads], dim=1)
            v = qkv[:, self.heads + self.kv_heads:]
            if isinstance(start, int):
                self.keys[index, :, :, start:end] = k
                self.values[index, :, :, start:end] = v
            else:
                # index_copy_ does not cast as slice assignment does (autocast hands bf16 to an fp32 cache)
                self.keys[index].index_copy_(2, start, k.to(self.keys.dtype))
                self.values[index].index_copy_(2, start, v.to(self.values.dtype))
            attended = self._attend(q, index, end, mask)  # [rows, length, heads * head_dim]
            hidden = hidden + layer.o(attended)
            x = rms_norm(hidden, layer.post_norm)
            hidden = hidden + layer.down(layer.act(layer.gate(x)) * layer.up(x))
        return rms_norm(hidden, self.norm)

    def _attend(self, q: torch.Tensor, index: int, end: int, mask: torch.Tensor) -> torch.Tensor:
        rows, heads, length, head_dim = q.shape
        keys, values = self.keys[index, :, :, :end], self.values[index, :, :, :end]
        if length == 1:
            # one query per head: fold each kv head's query group into the "sequence" axis, so grouped
            # query attention runs on the cache as stored, with no repeat of the keys; written out, as
            # sdpa's masked CPU path costs several times these four ops. In the cache's dtype, not
            # autocast's: a CPU's bf16 batched products of these shapes ran 2.8x slower than float32's
            # (143 against 52 us), casting the cache's keys at every step besides
            with torch.autocast("cpu", enabled=False) if q.device.type == "cpu" else contextlib.nullcontext():
                group = q.view(rows, self.kv_heads, heads // self.kv_heads, head_dim).to(keys.dtype)
                scores = (group @ keys.transpose(2, 3)).mul_(self.scale).add_(mask)  # [rows, kv heads, group, keys]
                return (scores.softmax(dim=-1) @ values).view(rows, 1, heads * head_dim)
        out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=self.scale,
                                             enable_gqa=self.kv_heads != heads)
        return out.transpose(1, 2).reshape(rows, length, heads * head_dim)


def _can_graph(rotary: nn.Module, device: torch.device) -> bool:
    """CUDA graphs on a GPU, unless the RoPE variant decides on the host per call (dynamic NTK scaling)."""
    rope_type = getattr(rotary, "rope_type", "default")
    return device.type == "cuda" and "dynamic" not in str(rope_type)


_SIDE_STREAMS: dict[int, torch.cuda.Stream] = {}


def _side_stream(device: torch.device) -> torch.cuda.Stream:
    """The one stream per GPU that every capture warms up and captures on. cuBLAS keeps a workspace
    (32 MiB on Hopper) for each stream it has run on, for good: a fresh stream per `generate` call left
    one behind each time (measured: 168 MB after five calls)."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _SIDE_STREAMS:
        _SIDE_STREAMS[index] = torch.cuda.Stream(device)
    return _SIDE_STREAMS[index]


class _GraphedStep:
    """`CachedDecoder.step` as one CUDA graph: captured at the first step, replayed after.

    The graph reads static buffers (the step's tokens, positions and cache column, copied in before each
    replay), writes keys and values into the column with `index_copy_` and attends over every cache
    column with the additive mask, so its shapes never change. Replay launches the whole forward at once.
    Off CUDA the same static-shape step runs eagerly (how the tests check it on a CPU).
    """

    def __init__(self) -> None:
        self.graph = None  # the decoder is passed in, not kept: a cycle would hold its cache until gc runs
        self.column = None

    def __call__(self, decoder: CachedDecoder, tokens: torch.Tensor, positions: torch.Tensor,
                 column: int) -> torch.Tensor | None:
        """[rows, hidden] final hidden states (a fresh tensor), or None when capture fails."""
        if self.column is None:
            self.tokens, self.positions = tokens.clone(), positions.clone()
            self.column = torch.tensor([column], device=tokens.device)
            if tokens.is_cuda and not self._capture(decoder):
                return None
        self.tokens.copy_(tokens)
        self.positions.copy_(positions)
        self.column.fill_(column)
        if self.graph is None:
            return self._run(decoder)
        self.graph.replay()
        return self.out.clone()  # the next replay overwrites `out`; callers keep each step's states

    def _run(self, decoder: CachedDecoder) -> torch.Tensor:
        decoder.key_bias.index_fill_(1, self.column, 0.0)
        hidden = decoder._forward(self.tokens[:, None], self.positions, decoder.key_bias[:, None, None, :], self.column)
        return hidden[:, -1]

    def _capture(self, decoder: CachedDecoder) -> bool:
        device = self.tokens.device
        # under mixed precision, casts must run inside the graph: autocast's weight-cast cache would hand
        # the graph tensors that die with the cache (PyTorch asks for cache_enabled=False when capturing)
        amp = torch.autocast("cuda", dtype=torch.get_autocast_dtype("cuda"), enabled=torch.is_autocast_enabled("cuda"),
                             cache_enabled=False)
        try:
            side = _side_stream(device)
            side.wait_stream(torch.cuda.current_stream(device))
            with amp, torch.cuda.stream(side):  # warm-up outside capture (cuBLAS workspaces, lazy inits);
                self._run(decoder)  # a step is idempotent: it rewrites the same cache column from the same inputs
            torch.cuda.current_stream(device).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with amp, torch.cuda.graph(graph, stream=side, capture_error_mode="thread_local"):
                self.out = self._run(decoder)
        except RuntimeError as error:
            warnings.warn(f"CUDA graph capture of the decode step failed ({error}); decoding without it.",
                          stacklevel=4)
            return False
        self.graph = graph
        return True
