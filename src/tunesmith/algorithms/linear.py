"""x W^T + b on CPU through oneDNN's fp32 GEMM where it beats the BLAS torch ships with.

torch's CPU wheels send float32 matmuls to MKL. On AMD CPUs MKL takes a slower code path: on an AMD
EPYC with AVX-512 (2 cores) it ran [1024, 512] x [512, 1536] at 170-200 GFLOP/s, where oneDNN, also
inside torch (`torch.ops.mkldnn._linear_pointwise`, the kernel torch.compile uses), ran it at 410-470,
and decoding's few-row matmuls at up to 1.7x. Which is faster depends on the machine, so
`onednn_is_faster` times both once per process on a training-sized matmul and keeps the answer; on a
CPU where MKL is at its best the two tie and nothing changes.

`linear` is the one entry point (model/fast_linear.py's layers, the decoders' projections, the chunked
output head); it falls back to `F.linear` off CPU, outside float32, under autocast, for tensor
subclasses and for small products (MIN_WORK), where oneDNN's cost per call is more than it saves.

oneDNN keeps compiled kernels per matmul shape, and a run sees many shapes (each packed batch has its
own length): tunesmith/__init__.py caps its two caches at 64 entries (`ONEDNN_PRIMITIVE_CACHE_CAPACITY`,
`LRU_CACHE_CAPACITY`) unless the environment sets them, or resident memory grows by about 0.75 MB per
shape seen.
"""

from __future__ import annotations

import os
import threading
import time

import torch
import torch.nn.functional as F

from tunesmith.errors import TunesmithError

# Products of fewer multiply-adds (rows x out x in) than this stay on F.linear: oneDNN's fixed cost is
# about 20 us a call against MKL's 5, so it lost on a 4M-parameter model's decoding (16 rows of [768, 256]:
# 46 against 43 us) and won from about this size up (64 rows of [256, 256]: 46 against 53 us; 1,016
# rows of LoRA's rank-8 A: 70 against 150 us). A value head's single output stays below it too.
MIN_WORK = 2**22
# oneDNN is used only when its calibration matmul is at least this much faster (timing noise aside).
REQUIRED_SPEEDUP = 1.15


_ONEDNN_LINEAR = torch.ops.mkldnn._linear_pointwise.default if hasattr(torch.ops.mkldnn, "_linear_pointwise") else None
"""oneDNN's linear, its overload resolved once (decoding calls it hundreds of times a token)."""


def onednn_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x [M, K] W^T [K, N] + b by oneDNN, no autograd (x and W may be strided views: the backward passes W^T)."""
    return _ONEDNN_LINEAR(x, weight, bias, "none", [], "")


def _available() -> bool:
    """oneDNN built into this torch."""
    return torch.backends.mkldnn.is_available() and _ONEDNN_LINEAR is not None


def _best_seconds(run, repeats: int = 5) -> float:  # noqa: ANN001
    run()  # the first call builds oneDNN's kernel / warms MKL's buffers
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - start)
    return best


_TIMING = threading.Lock()  # two threads' first calls must not time at once, each slowing the other
_CHOICE: list[bool] = []  # the timing's answer, once there is one


GEMM_VARIABLE = "TUNESMITH_GEMM"
"""Environment variable that fixes the float32 GEMM instead of timing: `onednn`, `blas` or `auto` (time it);
`onednn` or `blas` also fixes the library decoding packs float32 weights for (oneDNN's, or MKL's). For
separate runs that must round alike (a comparison on a machine near the threshold); a resume adopts
its checkpoint's choices by itself."""


def onednn_is_faster() -> bool:
    """Whether oneDNN runs a training-sized float32 matmul REQUIRED_SPEEDUP times faster than torch's BLAS
    here: timed once per process (about 20 ms), on a [256, 1024] x [1024, 1024] product; or what
    TUNESMITH_GEMM says."""
    if not _CHOICE:
        with _TIMING:
            if not _CHOICE:
                _CHOICE.append(_chosen())
    return _CHOICE[0]


def _chosen() -> bool:
    wanted = _gemm_variable()
    if wanted == "onednn" and not _available():
        raise TunesmithError(f"{GEMM_VARIABLE}=onednn, but this torch build has no oneDNN; set it to blas or auto.")
    return _timed_choice() if wanted == "auto" else wanted == "onednn"


def environment_choice(variable: str, choices: tuple[str, ...], auto_means: str) -> str:
    """The setting environment variable `variable` holds: one of `choices`, or "auto" when it is unset or
    empty; any other value is an error that names the variable, the choices and what auto does."""
    wanted = os.environ.get(variable, "").strip().lower() or "auto"
    if wanted not in ("auto", *choices):
        raise TunesmithError(f"{variable}={os.environ[variable]!r} is not a choice; set it to {', '.join(choices)} "
                             f"or auto ({auto_means}), or unset it.")
    return wanted


_ORIENTATIONS: dict[tuple[int, int, int, int], bool] = {}
"""(out, in, row bucket, threads) -> whether (W x^T)^T beat x W^T at first use."""


def weight_first(rows: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether (W x^T)^T is the faster BLAS orientation for `rows` [M, in] x `weight`'s shape (decoding's
    few-row products, model/lora.py `few_row_linear`). It depends on the CPU and the shape by up to 3x
    either way: W x^T won on AVX2 and AMD EPYC VMs (AVX2, [1536, 512], 4 rows: 0.28 against 0.89 ms); on a
    Sapphire Rapids VM x W^T won for 512-wide weights up to 8-12 rows (4 rows: 0.20 against 0.29 ms) and
    W x^T for [2048, 1024] from 4. So each shape is timed on a CPU the first time it meets a row bucket
    (1, 2-3, 4-7, 8-15, 16: six products) and keeps its answer; off CPU, W x^T."""
    if rows.device.type != "cpu":
        return True
    key = (*weight.shape, min(rows.shape[0].bit_length(), 5), torch.get_num_threads())
    choice = _ORIENTATIONS.get(key)
    if choice is None:
        choice = _ORIENTATIONS[key] = _weight_first_timed(rows, weight)
    return choice


def _weight_first_timed(rows: torch.Tensor, weight: torch.Tensor) -> bool:
    return _best_seconds(lambda: weight @ rows.t(), 2) < _best_seconds(lambda: rows @ weight.t(), 2)


def agree_on_choice(choice: bool) -> None:
    """Use `choice` from now on, whatever this process's own timing says: ranks of one run use one GEMM."""
    with _TIMING:
        _CHOICE[:] = [choice]


def agree_on_packing(library: str | None) -> None:
    """Pack float32 weights with `library` from now on (see `float32_packing`): ranks of one run pack alike."""
    with _TIMING:
        _PACKING[:] = [library]


def gemm_choices() -> dict[str, str]:
    """This process's CPU GEMM choices so far, for a checkpoint: `float32_gemm` (oneDNN or BLAS) and, once it
    has been chosen (a generation asked, or ranks agreed), `float32_packing`. A resumed run adopts them
    (`adopt_gemm_choices`), so it rounds as the run it continues whatever its own timings say (on a machine
    near the threshold they differ from one process to the next)."""
    choices = {"float32_gemm": _gemm_name()}
    if _PACKING and _PACKING[0] is not None:
        choices["float32_packing"] = _PACKING[0]
    return choices


def adopt_gemm_choices(choices: dict[str, str]) -> None:
    """Use a checkpoint's `gemm_choices` from now on, where this build can run them and the environment
    does not fix the GEMM (TUNESMITH_GEMM, which fixes both); ones it cannot run are left to this process."""
    if _gemm_variable() != "auto":
        return
    gemm = choices.get("float32_gemm")
    if gemm == "blas" or gemm == "onednn" and _available():
        agree_on_choice(gemm == "onednn")
    packing = choices.get("float32_packing")
    if packing == "onednn" and _can_pack_onednn() or packing == "mkl" and _can_pack_mkl():
        agree_on_packing(packing)


def gemm_for_children() -> str:
    """The TUNESMITH_GEMM value that makes the processes this one starts multiply as it does (each would time
    its own otherwise, and near the threshold they differ): the variable's own, else this process's choice."""
    wanted = _gemm_variable()
    return _gemm_name() if wanted == "auto" else wanted


def _gemm_name() -> str:
    return "onednn" if onednn_is_faster() else "blas"


def _gemm_variable() -> str:
    return environment_choice(GEMM_VARIABLE, ("onednn", "blas"), "time both once and take the faster")


def _timed_choice() -> bool:
    if not _available():
        return False
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(256, 1024, generator=generator)
    weight = torch.randn(1024, 1024, generator=generator)
    try:
        onednn = _best_seconds(lambda: onednn_linear(x, weight, None))
    except RuntimeError:  # a build whose oneDNN cannot run this CPU's fp32 kernels
        return False
    blas = _best_seconds(lambda: F.linear(x, weight))
    return blas > REQUIRED_SPEEDUP * onednn


_PLAIN = (torch.Tensor, torch.nn.Parameter)


def onednn_applies(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                   min_work: int | None = None) -> bool:
    """Whether `linear(x, weight, bias)` runs on oneDNN: float32 plain CPU tensors of matching sizes (else
    F.linear raises its own shape error), no autocast, oneDNN not switched off
    (`torch.backends.mkldnn.flags(enabled=False)`), a product of at least MIN_WORK multiply-adds, and a
    machine where oneDNN is the faster GEMM. `min_work` replaces MIN_WORK for callers that know better
    (one decoded row streams its weight from memory, where oneDNN wins far below MIN_WORK)."""
    return (x.device.type == "cpu" and x.dtype == torch.float32 and weight.dtype == torch.float32
            and type(x) is torch.Tensor and type(weight) in _PLAIN and weight.dim() == 2
            and x.shape[-1] == weight.shape[1]
            and x.numel() * weight.shape[0] >= (MIN_WORK if min_work is None else min_work)
            and (bias is None or (type(bias) in _PLAIN and bias.dtype == torch.float32
                                  and bias.shape == weight.shape[:1]))
            and not torch.is_autocast_enabled("cpu") and torch.backends.mkldnn.enabled and onednn_is_faster())


class _OneDnnLinear(torch.autograd.Function):
    """rows [M, K] W^T + b with its backward on oneDNN too: d rows = g W, d W = g^T rows, d b = sum g.
    Once differentiable (a double backward raises) and without forward-mode AD: oneDNN's op has no
    derivative formulas, and nothing here needs either."""

    @staticmethod
    def forward(ctx, rows, weight, bias):
        ctx.save_for_backward(rows if weight.requires_grad else None, weight)
        ctx.has_bias = bias is not None
        return onednn_linear(rows, weight, bias)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        rows, weight = ctx.saved_tensors
        needs = ctx.needs_input_grad
        grad_rows = onednn_linear(grad, weight.t(), None) if needs[0] else None
        grad_weight = onednn_linear(grad.t(), rows.t(), None) if needs[1] else None
        grad_bias = grad.sum(0) if ctx.has_bias and needs[2] else None
        return grad_rows, grad_weight, grad_bias


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x W^T + b, differentiable in all three, as `F.linear` computes it (on oneDNN where `onednn_applies`)."""
    if not onednn_applies(x, weight, bias):
        return F.linear(x, weight, bias)
    return linear_on_onednn(x, weight, bias)


def linear_on_onednn(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """`linear` on oneDNN, for callers that already asked `onednn_applies` (with their own threshold, or once
    for many chunks): the decoders' hot path need not ask twice."""
    rows = x.reshape(-1, x.shape[-1])
    needs_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, weight, bias))
    # the Function sees 2-D rows and the reshape stays outside it, so autograd may track in-place adds
    # to the result (LoRA adds its update into the base output). Without gradients (decoding) the
    # Function's own cost, about 12 us a call, is skipped.
    out = _OneDnnLinear.apply(rows, weight, bias) if needs_grad else onednn_linear(rows, weight, bias)
    return out.view(*x.shape[:-1], weight.shape[0])


# Decoding's few-row products, weights held in the GEMM library's own blocked layout (`packed_linear`).
# Measured on a 2-core Sapphire Rapids VM, ms for [1536, 512] (8 rows / 16 rows) and the 40M model's
# [32000, 512] head (8 rows): float32 x W^T 0.30 / 0.49 / 11.4, W x^T 0.35 / 0.35 / 6.8, MKL packed for
# that row count 0.21 / 0.27 / 3.9; bfloat16 x W^T 0.17, oneDNN packed 0.12 / 0.12 / 1.7.
# On an AMD EPYC VM (AVX-512, 2 cores) oneDNN's plain kernel reorders the weight at every call; packed
# once, oneDNN's float32 product took [3072, 512] at 8 / 16 rows from 0.24 / 0.60 ms to 0.14 / 0.27 and
# the head at 1 / 8 / 16 rows from 2.4 / 4.5 / 5.8 to 2.3 / 2.5 / 3.2 (MKL's packed GEMM ran 0.34 / 0.54
# and 9.0 there), for any row count.
PACK_MIN_WEIGHT = 2**16  # smaller weights sit in cache: the layout gains nothing there
PACK_MIN_ROWS = 2  # one row: MKL's plain matrix-vector product is as fast


class PackedLinear:
    """x W^T + b for a weight that many small products read (decoding), reordered once into the GEMM's
    blocked layout: float32 by MKL's packed GEMM for exactly `rows` rows (other row counts: `takes` is
    False and the caller computes as before) or by oneDNN, whichever `float32_packing` chose; bfloat16 by
    oneDNN. oneDNN's packing computes any row count. A copy of the weight, held as long as the object: a
    decoder packs its weights for one generation, not for good."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, rows: int | None, library: str) -> None:
        self.bias, self.dtype = bias, weight.dtype
        self.out_features, self.in_features = weight.shape
        self.rows = rows if library == "mkl" else None
        """The one row count this packing computes (MKL's); None: any (oneDNN's, `rows` only a hint)."""
        self.weight = weight if library == "mkl" else None
        """MKL's product reads the plain weight too; oneDNN's only its packed copy."""
        if library == "mkl":
            self.packed = torch.ops.mkl._mkl_reorder_linear_weight(weight, rows)
        else:
            self.packed = torch.ops.mkldnn._reorder_linear_weight(weight, rows or 1)

    def takes(self, x: torch.Tensor) -> bool:
        """Whether `x` [..., in] is a product this packing computes."""
        return self.rows is None or x.numel() == self.rows * self.in_features

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.rows is None and x.dim() == 2 and x.dtype == self.dtype:  # a decode step's rows: no reshaping
            return _ONEDNN_LINEAR(x, self.packed, self.bias, "none", [], "")
        rows = x.reshape(-1, self.in_features).to(self.dtype)
        if self.rows is not None:
            out = torch.ops.mkl._mkl_linear(rows, self.packed, self.weight, self.bias, self.rows)
        else:
            out = _ONEDNN_LINEAR(rows, self.packed, self.bias, "none", [], "")
        return out.view(*x.shape[:-1], self.out_features)


def packed_linear(weight: torch.Tensor, bias: torch.Tensor | None, rows: int | None) -> PackedLinear | None:
    """`weight` (and `bias`) packed for decoding `rows` rows at a time (None: row counts vary), or None where
    packing does not pay or cannot run: off CPU, under gradients, weights below PACK_MIN_WEIGHT; float32 by
    the library `float32_packing` chose (MKL's only for a fixed row count of at least PACK_MIN_ROWS);
    bfloat16 with oneDNN's bf16 kernels; never any other dtype."""
    if (weight.device.type != "cpu" or weight.dim() != 2 or type(weight) not in _PLAIN or weight.numel() < PACK_MIN_WEIGHT
            or torch.is_grad_enabled() and weight.requires_grad or not torch.backends.mkldnn.enabled
            or (bias is not None and (bias.dtype != weight.dtype or type(bias) not in _PLAIN))):
        return None
    library = _packing_library(weight.dtype, rows)
    if library is None:
        return None
    try:
        packed = PackedLinear(weight.detach().contiguous(), None if bias is None else bias.detach().contiguous(),
                              rows, library)
        packed(weight.new_zeros(rows or 1, weight.shape[1]))  # a build that packs but cannot run it falls back here
    except RuntimeError:  # a build whose kernels cannot run on this CPU
        return None
    return packed


def _packing_library(dtype: torch.dtype, rows: int | None) -> str | None:
    """Which library packs a weight of `dtype` for `rows` rows here: "onednn", "mkl", or None (neither pays)."""
    if dtype == torch.bfloat16:
        return "onednn" if _can_pack_onednn() and torch.ops.mkldnn._is_mkldnn_bf16_supported() else None
    if dtype != torch.float32:
        return None
    library = float32_packing()
    if library == "mkl" and (rows is None or rows < PACK_MIN_ROWS):
        return None
    return library


def _can_pack_onednn() -> bool:
    return _available() and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")


def _can_pack_mkl() -> bool:
    return torch.backends.mkl.is_available() and hasattr(torch.ops.mkl, "_mkl_reorder_linear_weight")


_PACKING: list[str | None] = []  # float32_packing's answer, once there is one


def float32_packing() -> str | None:
    """Which library packs float32 weights for decoding here: "onednn" or "mkl", whichever computed an 8-row
    product of a [2048, 1024] packed weight faster, timed once per process (about 30 ms); None where
    neither can; or the library TUNESMITH_GEMM names. A question of its own, not `onednn_is_faster`'s: on an
    AMD EPYC VM oneDNN's packed product ran 3-5x faster than MKL's in every process, where that
    training-sized timing sat near its threshold and went either way from one process to the next."""
    if not _PACKING:
        wanted = _gemm_variable()
        with _TIMING:
            if not _PACKING:
                _PACKING.append(_timed_packing() if wanted == "auto" else _named_packing(wanted == "onednn"))
    return _PACKING[0]


def _named_packing(onednn: bool) -> str | None:
    if onednn:
        return "onednn" if _can_pack_onednn() else None
    return "mkl" if _can_pack_mkl() else None


def _timed_packing() -> str | None:
    candidates = [name for name, can in (("onednn", _can_pack_onednn()), ("mkl", _can_pack_mkl())) if can]
    if len(candidates) < 2:
        return candidates[0] if candidates else None
    generator = torch.Generator().manual_seed(0)
    weight, x = torch.randn(2048, 1024, generator=generator), torch.randn(8, 1024, generator=generator)
    seconds = {}
    for name in candidates:
        try:
            packed = PackedLinear(weight, None, 8, name)
            seconds[name] = _best_seconds(lambda packed=packed: packed(x), 3)
        except RuntimeError:  # a build whose kernels cannot run on this CPU
            continue
    return min(seconds, key=seconds.get) if seconds else None
