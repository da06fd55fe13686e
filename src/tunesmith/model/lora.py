"""LoRA: a trainable low-rank update beside a frozen linear layer (Hu et al. 2021; the book's Algorithm 2.1).

    h = W x + (alpha / r) * B A dropout(x)        A: [r, in], B: [out, r], B = 0 at init
    rsLoRA (Kalajdzievski 2023) uses alpha / sqrt(r) instead, so the update's scale does not shrink with rank.

`inject_lora` swaps matching `nn.Linear` modules of any model for `LoRALinear` and freezes everything else.
The adapter can be switched off (`disable_lora`), so during DPO/PPO the policy doubles as its own frozen
reference model at no memory cost, and merged into the base weight (`merge_lora`, `merge_and_unload`)
for export or for stacking several adapters. Module and tensor names follow PEFT
(`q_proj.base_layer.weight`, `q_proj.lora_A.weight`), so adapters round-trip with PEFT (see adapters.py).

Usage:
    names = inject_lora(model, ["q_proj", "v_proj"], rank=8, alpha=16)
    optimizer = torch.optim.AdamW(lora_parameters(model), lr=1e-4)
    with disable_lora(model):
        ref_logits = model(input_ids).logits
"""

import math
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from tunesmith.algorithms.linear import linear, linear_on_onednn, onednn_applies, weight_first
from tunesmith.errors import TunesmithError
from tunesmith.model.quantize import is_quantized_linear

# Heads that map hidden states to vocabulary / class / value scores: "all" never adapts them (PEFT does
# the same for "all-linear"), since a low-rank update of the output head is rarely what anyone wants.
OUTPUT_HEAD_NAMES = ("lm_head", "score", "v_head")


FEW_ROWS = 16
# Where oneDNN is the faster float32 GEMM (algorithms/linear.py), decoding's products go to it by row count
# (AMD EPYC, weights streamed from memory, ms for the 40M model's [32000, 512] head / 24 [1536, 512] weights):
# one row, oneDNN (3.7 against 9.0 / 2.3 against 7.1: W x^T with one column is a slow matrix-vector
# product); 2-7 rows, W x^T (3.4 against 6.0 / 2.2 against 3.6 at 4 rows); from 8 rows, oneDNN's own
# threshold (equal at 8, oneDNN 1.6x at 16).
ONE_ROW_MIN_WEIGHT = 2**18  # below it a single row's product is too small for oneDNN's cost per call
ONEDNN_FROM_ROWS = 8


def lora_update(x: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float) -> torch.Tensor:
    """scaling * (x A^T) B^T in the adapter's dtype; the scaling is applied to the rank-r activations, not
    the [..., out] update: the same product for r/out of the work."""
    return linear(linear(x.to(lora_A.dtype), lora_A) * scaling, lora_B)


def few_row_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x W^T + b. For a handful of rows (decoding) of a float32 weight, by BLAS as x W^T or as (W x^T)^T,
    whichever is faster for this weight's shape and row count (on a CPU timed at first use,
    `algorithms.linear.weight_first`; on a GPU (W x^T)^T). Not for bf16: oneDNN runs W x^T 1.2-1.4x slower
    (AVX512-BF16, 4 rows, weights from memory: 202 against 145 us for [1536, 512]). Where oneDNN is the faster float32 GEMM, one row and 8 or
    more rows go to it (see ONEDNN_FROM_ROWS)."""
    count = x.numel() // x.shape[-1]
    if ((count == 1 and onednn_applies(x, weight, bias, min_work=ONE_ROW_MIN_WEIGHT))
            or (count >= ONEDNN_FROM_ROWS and onednn_applies(x, weight, bias))):
        return linear_on_onednn(x, weight, bias)
    rows = x.reshape(-1, x.shape[-1])
    if count > FEW_ROWS or weight.dtype != torch.float32 or not weight_first(rows, weight):
        return nn.functional.linear(x, weight, bias)
    out = (weight @ rows.t()).t()
    if bias is not None:
        out = out + bias
    return out.reshape(*x.shape[:-1], weight.shape[0])


class LoRALinear(nn.Module):
    """A frozen `nn.Linear` (`base_layer`) plus the low-rank path `scaling * lora_B(lora_A(dropout(x)))`."""

    def __init__(
        self, base: nn.Linear, rank: int, alpha: float, dropout: float = 0.0, use_rslora: bool = False
    ) -> None:
        super().__init__()
        if rank < 1:
            raise TunesmithError(
                f"LoRA rank must be a positive integer, got {rank}; set lora_rank to e.g. 8."
            )
        self.base_layer = base
        # bitsandbytes' 4/8-bit matmul returns a view that autograd forbids changing in place
        self.add_in_place = not is_quantized_linear(base)
        self.rank = rank
        self.scaling = alpha / math.sqrt(rank) if use_rslora else alpha / rank
        # LoRA weights stay fp32 whatever the base dtype: their updates are small and bf16 would round them away.
        factory = {"device": base.weight.device, "dtype": torch.float32}
        self.lora_A = nn.Linear(base.in_features, rank, bias=False, **factory)
        self.lora_B = nn.Linear(rank, base.out_features, bias=False, **factory)
        # Identity when p == 0 so the hot path pays for no random mask.
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.disabled = False
        self.merged = False
        self.inference_weight: torch.Tensor | None = None  # set only inside `merged_for_inference`
        # Frozen extra adapters on the same base (a LoRA reward model beside the policy): name -> (A, B,
        # scaling) as plain tensors, outside parameters and state_dict; `side_adapter` switches one on.
        self.side: dict[str, tuple[torch.Tensor, torch.Tensor, float]] = {}
        self.active_side: str | None = None
        self.reset_lora_parameters()

    def reset_lora_parameters(self) -> None:
        """A ~ Kaiming-uniform(a=sqrt(5)) as PEFT's default, B = 0, so the wrapped layer starts as the base."""
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Base output plus whichever update is active: a side adapter's, the merged inference weight, or LoRA's."""
        if self.active_side is not None:  # another adapter on the same base: base + its update, or the base
            result = self.base_layer(x)
            if self.active_side not in self.side:
                return result
            lora_A, lora_B, scaling = self.side[self.active_side]
            return self._add(result, lora_update(x, lora_A, lora_B, scaling))
        if self.inference_weight is not None and not self.disabled:
            return few_row_linear(x, self.inference_weight, self.base_layer.bias)
        result = self.base_layer(x)  # [..., out]
        if self.disabled or self.merged:
            return result
        lora_x = self.lora_dropout(x.to(self.lora_A.weight.dtype))
        return self._add(result, lora_update(lora_x, self.lora_A.weight, self.lora_B.weight, self.scaling))

    def _add(self, result: torch.Tensor, update: torch.Tensor) -> torch.Tensor:
        """result + update, in place where allowed: the base output is not saved for backward."""
        update = update.to(result.dtype)
        return result.add_(update) if self.add_in_place else result + update

    def delta_weight(self) -> torch.Tensor:
        """scaling * B @ A in fp32, shaped like the base weight [out, in]."""
        return (self.lora_B.weight.float() @ self.lora_A.weight.float()) * self.scaling

    @torch.no_grad()
    def merge(self) -> None:
        """W <- W + scaling * B A; forward then runs the base layer alone."""
        if self.merged:
            return
        if is_quantized_linear(self.base_layer):
            raise TunesmithError(
                "A LoRA adapter cannot be merged into a 4/8-bit (quantization_bit) base. With quantization_bit, "
                "sft can continue training one adapter (adapter_name_or_path with a single folder); to build on "
                "earlier adapters, merge them first with `tunesmith export` (full precision) and use the export "
                "as model_name_or_path.")
        weight = self.base_layer.weight
        weight.copy_(weight.float() + self.delta_weight())
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """W <- W - scaling * B A, the inverse of `merge` (exact in fp32, up to rounding in bf16)."""
        if not self.merged:
            return
        weight = self.base_layer.weight
        weight.copy_(weight.float() - self.delta_weight())
        self.merged = False

    def extra_repr(self) -> str:
        """Rank and scaling in `print(model)`, where the adapter's shape alone would not show them."""
        return f"rank={self.rank}, scaling={self.scaling:g}"


def lora_modules(model: nn.Module) -> Iterator[tuple[str, LoRALinear]]:
    """Yield (module path, LoRALinear) for every adapted layer, in `named_modules` order."""
    for name, module in model.named_modules():
        if isinstance(module, LoRALinear):
            yield name, module


def lora_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The LoRA A and B weights of every adapted layer (what the optimizer should see)."""
    return [p for _, module in lora_modules(model) for p in (module.lora_A.weight, module.lora_B.weight)]


def _is_target(name: str, targets: list[str]) -> bool:
    # PEFT's rule for a list: the full path, or a suffix of it on a "." boundary ("q_proj" matches
    # "model.layers.0.self_attn.q_proj"); full paths let PEFT's expanded "all-linear" lists load too.
    return any(name == t or name.endswith("." + t) for t in targets)


def _output_heads(model: nn.Module) -> set[int]:
    """ids of the modules "all" must skip: the output embeddings, anything named like a head, and the
    layers inside such a head (a value head's `summary` Linear)."""
    heads = {id(sub) for name, m in model.named_modules() if name.rsplit(".", 1)[-1] in OUTPUT_HEAD_NAMES
             for sub in m.modules()}
    get_output_embeddings = getattr(model, "get_output_embeddings", None)
    output_embeddings = get_output_embeddings() if get_output_embeddings is not None else None
    if output_embeddings is not None:
        heads.add(id(output_embeddings))
    return heads


def select_linears(model: nn.Module, target_modules: str | list[str]) -> list[str]:
    """Paths of the Linear layers `target_modules` selects ("all": every one but the output heads). A LoRA
    layer counts as the Linear it wraps, under its own path, so an adapter's targets can be matched
    against a model that already carries another adapter."""
    linears = [(name, m) for name, m in model.named_modules() if isinstance(m, LoRALinear)
               or (isinstance(m, nn.Linear) and not name.endswith((".base_layer", ".lora_A", ".lora_B")))]
    if target_modules == "all":
        heads = _output_heads(model)
        return [name for name, m in linears if id(m) not in heads]
    targets = [target_modules] if isinstance(target_modules, str) else list(target_modules)
    return [name for name, _ in linears if _is_target(name, targets)]


def find_lora_targets(model: nn.Module, target_modules: str | list[str]) -> list[str]:
    """Paths of the nn.Linear modules `target_modules` selects ("all": every one but the output head)."""
    existing = [name for name, _ in lora_modules(model)]
    if existing:
        raise TunesmithError(
            f"The model already has LoRA layers (e.g. {existing[0]}); merge them with merge_and_unload "
            f"before adding another adapter."
        )
    found = select_linears(model, target_modules)
    if not found:
        short_names = sorted({name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, nn.Linear)})
        raise TunesmithError(
            f"lora_target {target_modules!r} matches no nn.Linear module of {type(model).__name__}. "
            f"Its Linear modules are named: {', '.join(short_names) or '(none)'}. "
            f"Set lora_target to some of these names, or to 'all'."
        )
    return found


def inject_lora(
    model: nn.Module,
    target_modules: str | list[str],
    rank: int,
    alpha: float,
    dropout: float = 0.0,
    use_rslora: bool = False,
) -> list[str]:
    """Replace the targeted nn.Linear modules by LoRALinear in place; freeze all but the LoRA weights.

    Returns the paths of the replaced modules. One adapter at a time: call `merge_and_unload` before
    injecting another, which is how `apply_adapters` stacks them.
    """
    names = find_lora_targets(model, target_modules)
    for p in model.parameters():
        p.requires_grad_(False)
    for name in names:
        parent_name, _, child_name = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        base = getattr(parent, child_name)
        lora = LoRALinear(base, rank, alpha, dropout, use_rslora)
        # New modules start in train mode; follow the base so an eval-mode model gets no LoRA dropout.
        lora.train(base.training)
        setattr(parent, child_name, lora)
    return names


@contextmanager
def disable_lora(model: nn.Module) -> Iterator[None]:
    """Run the model as its base inside the block: the policy serves as the reference model for free."""
    modules = [m for _, m in lora_modules(model)]
    if any(m.merged for m in modules):
        raise TunesmithError(
            "Cannot disable LoRA while it is merged into the base weights; call unmerge_lora(model) first."
        )
    for m in modules:
        m.disabled = True
    try:
        yield
    finally:
        for m in modules:
            m.disabled = False


@contextmanager
def merged_for_inference(model: nn.Module) -> Iterator[None]:
    """Inside the block every adapted layer runs one matmul with a temporary W + scaling * B A instead of
    three (base, A, B): what sampling wants, where each token is a tiny matmul per layer. The base
    weights are untouched (no merge/unmerge rounding), at the cost of a copy of the adapted weights
    while the block runs; layers with a bf16/fp16 base keep the unmerged path. Gradients do not flow
    through it: use it under torch.no_grad."""
    # Only for fp32 bases: rounding W + scaling * B A to bf16/fp16 would swallow the small updates
    # early in training, so the sampler would not be the policy whose log-probs are computed.
    modules = [m for _, m in lora_modules(model) if not m.merged and m.base_layer.weight.dtype == torch.float32]
    try:
        with torch.no_grad():
            for m in modules:
                m.inference_weight = m.base_layer.weight + m.delta_weight()
        yield
    finally:
        for m in modules:
            m.inference_weight = None


@contextmanager
def side_adapter(model: nn.Module, name: str) -> Iterator[None]:
    """Run the model as base + the side adapter `name` inside the block (layers without it run the base)."""
    modules = [m for _, m in lora_modules(model)]
    for m in modules:
        m.active_side = name
    try:
        yield
    finally:
        for m in modules:
            m.active_side = None


def merge_lora(model: nn.Module) -> None:
    """Fold every adapter into its base weight (faster inference); `unmerge_lora` undoes it."""
    for _, m in lora_modules(model):
        m.merge()


def unmerge_lora(model: nn.Module) -> None:
    """Take every merged adapter back out of its base weight."""
    for _, m in lora_modules(model):
        m.unmerge()


def merge_and_unload(model: nn.Module) -> nn.Module:
    """Merge every adapter and put the plain nn.Linear back: a regular model for export or the next adapter."""
    for name, m in list(lora_modules(model)):
        m.merge()
        parent_name, _, child_name = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child_name, m.base_layer)
    return model
