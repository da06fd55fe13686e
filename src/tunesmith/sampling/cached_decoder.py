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
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from tunesmith.sampling.decode_weights import (
    LayerWeights,
    PairedProjection,
    Projection,
    cast_projection,
    join_projections,
    module_projection,
    pack_layer,
)

if TYPE_CHECKING:
    from transformers import PreTrainedModel

SUPPORTED_TYPES = ("llama", "qwen2", "mistral")


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
    projections = [module_projection(m) for m in (attention.q_proj, attention.k_proj, attention.v_proj, attention.o_proj,
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
    return LayerWeights(input_norm, join_projections([q, k, v]), o, post_norm, PairedProjection(gate, up), down,
                        block.mlp.act_fn)


def autocast_matmul_dtype(device: torch.device) -> torch.dtype | None:
    """The dtype autocast runs matmuls in on `device` right now (bf16 sampling, a bf16 run's rollouts);
    None when it is off."""
    return torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type) else None


def rms_norm_weights(module: nn.Module) -> tuple[torch.Tensor, float] | None:
    """(weight, eps) of a Llama-style RMSNorm (weight * x / rms(x)), None for any other norm."""
    eps = getattr(module, "variance_epsilon", None)
    weight = getattr(module, "weight", None)
    if eps is None or weight is None or type(module).__name__ not in ("LlamaRMSNorm", "Qwen2RMSNorm", "MistralRMSNorm"):
        return None
    return weight, eps


def rms_norm(x: torch.Tensor, norm: tuple[torch.Tensor, float]) -> torch.Tensor:
    """transformers' order of operations: normalise in fp32, cast back, then scale. By torch's own op: one
    call where seven were written out (10 against 12 us alone for 4 rows of 512; on CPU torch composes it
    of the same kernels, so inside a decode step it saves Python, not arithmetic)."""
    weight, eps = norm
    if x.dtype == weight.dtype == torch.float32 and x.device.type == "cpu":  # a GPU's fused kernel rounds otherwise
        return F.rms_norm(x, weight.shape, weight, eps)
    return weight * F.rms_norm(x.float(), x.shape[-1:], None, eps).to(x.dtype)


def rope_qkv(qkv: torch.Tensor, heads: int, kv_heads: int, cos: torch.Tensor,
             sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(q, k, v) of a joined projection [..., heads + 2 kv heads, ..., head_dim] (heads on dim 1), RoPE applied
    to q and k in one call, not two."""
    q, k = rope(qkv[:, :heads + kv_heads], cos, sin).split([heads, kv_heads], dim=1)
    return q, k, qkv[:, heads + kv_heads:]


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
        hidden = self._one_position(tokens, positions, column)
        self.length = column + 1
        return hidden

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
            q, k, v = rope_qkv(qkv, self.heads, self.kv_heads, cos, sin)
            if isinstance(start, int):
                self.keys[index, :, :, start:end] = k
                self.values[index, :, :, start:end] = v
            else:
                # index_copy_ does not cast as slice assignment does (autocast hands bf16 to an fp32 cache)
                self.keys[index].index_copy_(2, start, k.to(self.keys.dtype))
                self.values[index].index_copy_(2, start, v.to(self.values.dtype))
            attended = self._attend(q, index, end, mask)  # [rows, length, heads * head_dim]
            hidden = hidden + layer.o(attended)
            hidden = hidden + layer.down(layer.gate_up.gated(layer.act, rms_norm(hidden, layer.post_norm)))
        return rms_norm(hidden, self.norm)

    def _one_position(self, tokens: torch.Tensor, positions: torch.Tensor, column: int) -> torch.Tensor:
        """`_forward` of one token per row at cache column `column`, as [rows, features] tensors: final hidden
        states [rows, hidden]. A decode step of a small model is bound by its ops' count, not their size;
        without the length axis the projections, RoPE and cache writes take no reshapes and views (sampling
        64 tokens for GRPO's 8 rows of the 40M model: 0.85 s against 0.88, the same tokens and log-probs)."""
        rows, heads, kv_heads, head_dim = tokens.shape[0], self.heads, self.kv_heads, self.head_dim
        hidden = self.embed(tokens)  # [rows, hidden]
        cos, sin = self.rotary(hidden, positions)  # [rows, 1, head_dim]: one position, every head alike
        mask = self.key_bias[:, None, None, :column + 1]
        for index, layer in enumerate(self.layers):
            qkv = layer.qkv(rms_norm(hidden, layer.input_norm)).view(rows, heads + 2 * kv_heads, head_dim)
            q, k = rope(qkv[:, :heads + kv_heads], cos, sin).split([heads, kv_heads], dim=1)
            self.keys[index, :, :, column] = k
            self.values[index, :, :, column] = qkv[:, heads + kv_heads:]
            attended = self._attend(q[:, :, None], index, column + 1, mask).view(rows, heads * head_dim)
            hidden = hidden + layer.o(attended)
            hidden = hidden + layer.down(layer.gate_up.gated(layer.act, rms_norm(hidden, layer.post_norm)))
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
            cpu_autocast = q.device.type == "cpu" and torch.is_autocast_enabled("cpu")
            with torch.autocast("cpu", enabled=False) if cpu_autocast else contextlib.nullcontext():
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
