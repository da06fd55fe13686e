"""algorithms/linear.py: oneDNN's float32 product and its backward against float64 and F.linear."""

import pytest
import torch
import torch.nn.functional as F

from tunesmith.algorithms import linear as fast

needs_onednn = pytest.mark.skipif(not fast._available(), reason="this torch build has no oneDNN")


def _inputs(rows: int, inner: int, outer: int, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, inner, generator=generator, dtype=torch.float64)
    weight = torch.randn(outer, inner, generator=generator, dtype=torch.float64) / inner**0.5
    bias = torch.randn(outer, generator=generator, dtype=torch.float64)
    return x, weight, bias


@needs_onednn
@pytest.mark.parametrize("rows,inner,outer", [(1, 64, 96), (37, 128, 8), (300, 96, 160)])
def test_the_onednn_product_and_its_gradients_match_float64(rows, inner, outer):
    x64, w64, b64 = (t.requires_grad_() for t in _inputs(rows, inner, outer))
    x32, w32, b32 = (t.detach().float().requires_grad_() for t in (x64, w64, b64))
    grad_out = torch.randn(rows, outer, dtype=torch.float64)
    (x64 @ w64.t() + b64).backward(grad_out)
    out = fast._OneDnnLinear.apply(x32, w32, b32)
    out.backward(grad_out.float())
    torch.testing.assert_close(out.double(), x64 @ w64.t() + b64, rtol=1e-5, atol=1e-5)
    for mine, reference in ((x32, x64), (w32, w64), (b32, b64)):
        torch.testing.assert_close(mine.grad.double(), reference.grad, rtol=1e-4, atol=1e-4)


@needs_onednn
def test_linear_takes_any_leading_shape_and_lets_autograd_add_in_place(monkeypatch):
    monkeypatch.setattr(fast, "onednn_is_faster", lambda: True)
    monkeypatch.setattr(fast, "MIN_WORK", 1)
    x, weight, _ = (t.float() for t in _inputs(2 * 5, 32, 48))
    x = x.view(2, 5, 32).requires_grad_()
    out = fast.linear(x, weight)
    assert out.shape == (2, 5, 48)
    out.add_(1.0)  # LoRA adds its update into the base output in place
    out.sum().backward()
    torch.testing.assert_close(x.grad, weight.sum(0).expand(2, 5, 32), rtol=1e-5, atol=1e-5)


def test_linear_is_f_linear_where_onednn_does_not_apply(monkeypatch):
    monkeypatch.setattr(fast, "onednn_is_faster", lambda: True)
    x, weight, bias = (t.float() for t in _inputs(64, 256, 256))  # 64 x 256 x 256: exactly MIN_WORK
    assert fast.onednn_applies(x, weight)
    cases = {
        "bf16": (x.bfloat16(), weight.bfloat16()),
        "a value head": (x, weight[:1]),  # one output: below MIN_WORK
        "few rows": (x[:63], weight),
        "no rows": (x[:0], weight),
    }
    for name, (rows, matrix) in cases.items():
        assert not fast.onednn_applies(rows, matrix), name
        assert torch.equal(fast.linear(rows, matrix), F.linear(rows, matrix)), name
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not fast.onednn_applies(x, weight)
        assert fast.linear(x, weight, bias).dtype == torch.bfloat16  # autocast's own linear
    monkeypatch.setattr(fast, "onednn_is_faster", lambda: False)
    assert not fast.onednn_applies(x, weight)


@pytest.mark.parametrize("trainable_head", [True, False])
def test_the_output_head_on_onednn_equals_it_on_torch(trainable_head, monkeypatch):
    """The chunked head's oneDNN branches (fresh logits per chunk, the head products) against torch's."""
    from tunesmith.algorithms.logprobs import chunked_logprobs_entropy_at, chunked_nll

    if not fast._available():
        pytest.skip("this torch build has no oneDNN")
    monkeypatch.setattr(fast, "MIN_WORK", 1)
    results = {}
    for choice in (False, True):
        monkeypatch.setattr(fast, "onednn_is_faster", lambda choice=choice: choice)
        torch.manual_seed(0)
        head = torch.nn.Linear(32, 300).requires_grad_(trainable_head)
        hidden = torch.randn(20, 32, requires_grad=True)
        targets = torch.randint(0, 300, (20,))
        labels = torch.cat([torch.full((1, 1), -100), targets[None, :19]], dim=1)
        logps, entropy = chunked_logprobs_entropy_at(hidden, head, targets, chunk_size=7, temperature=0.7,
                                                     entropy_grad=trainable_head)
        nll, _ = chunked_nll(hidden[None], head, labels, chunk_size=6)
        (logps.sum() + (entropy.sum() if trainable_head else 0) + nll).backward()
        results[choice] = [logps, entropy, nll, hidden.grad] + ([head.weight.grad, head.bias.grad] if trainable_head else [])
    for on_torch, on_onednn in zip(results[False], results[True]):
        torch.testing.assert_close(on_onednn, on_torch, rtol=1e-5, atol=1e-5)


@needs_onednn
def test_a_second_derivative_raises_rather_than_coming_out_wrong():
    x, weight, _ = (t.float().requires_grad_() for t in _inputs(5, 16, 24))
    (grad_weight,) = torch.autograd.grad(fast._OneDnnLinear.apply(x, weight, None).square().sum(), weight,
                                         create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable"):
        grad_weight.sum().backward()


needs_mkl_pack = pytest.mark.skipif(not (torch.backends.mkl.is_available()
                                         and hasattr(torch.ops.mkl, "_mkl_reorder_linear_weight")),
                                    reason="this torch build has no MKL packed GEMM")
needs_bf16_pack = pytest.mark.skipif(not (fast._available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()),
                                     reason="no oneDNN bfloat16 kernels on this CPU")


@needs_mkl_pack
def test_a_float32_packed_weight_computes_x_w_t_plus_b_for_its_own_row_count(monkeypatch):
    monkeypatch.setattr(fast, "float32_packing", lambda: "mkl")
    x64, w64, b64 = _inputs(8, 512, 384)
    packed = fast.packed_linear(w64.float(), b64.float(), rows=8)
    assert packed is not None
    x = x64.float().view(2, 4, 512)
    assert packed.takes(x) and not packed.takes(x[:1])
    torch.testing.assert_close(packed(x).double(), (x64 @ w64.t() + b64).view(2, 4, 384), rtol=1e-5, atol=1e-5)


@needs_bf16_pack
@pytest.mark.parametrize("rows", [1, 5, 64])
def test_a_bfloat16_packed_weight_takes_any_row_count_as_a_bf16_linear(rows):
    x64, w64, b64 = _inputs(rows, 384, 512, seed=rows)
    weight, bias = w64.bfloat16(), b64.bfloat16()
    packed = fast.packed_linear(weight, bias, rows=8)
    assert packed is not None and packed.takes(x64)
    out = packed(x64.float())  # cast to the weight's dtype, as autocast's linear would
    assert out.dtype == torch.bfloat16
    reference = x64.bfloat16().double() @ weight.double().t() + bias.double()  # the same bf16 operands, exactly
    torch.testing.assert_close(out.double(), reference, rtol=1e-2, atol=2e-2)


def test_packing_is_declined_where_it_cannot_pay_or_run(monkeypatch):
    monkeypatch.setattr(fast, "float32_packing", lambda: "mkl")
    weight = torch.randn(512, 512)
    assert fast.packed_linear(weight, None, rows=1) is None  # one row: the plain product is as fast
    assert fast.packed_linear(weight, None, rows=None) is None  # float32 needs a fixed row count
    assert fast.packed_linear(torch.randn(64, 64), None, rows=8) is None  # sits in cache anyway
    assert fast.packed_linear(weight.half(), None, rows=8) is None
    assert fast.packed_linear(weight, torch.randn(512).double(), rows=8) is None  # bias of another dtype
    trained = weight.clone().requires_grad_()
    assert fast.packed_linear(trained, None, rows=8) is None  # a copy would not follow its updates
    with torch.backends.mkldnn.flags(enabled=False):
        assert fast.packed_linear(weight, None, rows=8) is None


needs_onednn_pack = pytest.mark.skipif(not (fast._available() and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")),
                                       reason="this torch build cannot pack weights for oneDNN")


@needs_onednn_pack
@pytest.mark.parametrize("rows", [1, 3, 8, 40])
def test_where_onednn_packs_float32_its_packing_computes_x_w_t_plus_b_for_any_row_count(monkeypatch, rows):
    monkeypatch.setattr(fast, "float32_packing", lambda: "onednn")
    x64, w64, b64 = _inputs(rows, 512, 384, seed=rows)
    packed = fast.packed_linear(w64.float(), b64.float(), rows=None)  # the row count is only a hint
    assert packed is not None and packed.rows is None and packed.takes(x64)
    out = packed(x64.float().view(1, rows, 512))
    assert out.dtype == torch.float32 and out.shape == (1, rows, 384)
    torch.testing.assert_close(out.double().view(rows, 384), x64 @ w64.t() + b64, rtol=1e-5, atol=1e-5)


def test_the_float32_packing_is_timed_once_and_takes_the_faster_library(monkeypatch):
    monkeypatch.delenv("TUNESMITH_GEMM", raising=False)
    monkeypatch.setattr(fast, "_PACKING", [])
    monkeypatch.setattr(fast, "_can_pack_onednn", lambda: True)
    monkeypatch.setattr(fast, "_can_pack_mkl", lambda: True)
    monkeypatch.setattr(fast, "PackedLinear", lambda weight, bias, rows, library: lambda x: library)
    timings = {"onednn": 2.0, "mkl": 1.0}
    monkeypatch.setattr(fast, "_best_seconds", lambda run, repeats: timings[run()])
    assert fast.float32_packing() == "mkl"
    timings.update(mkl=3.0)
    assert fast.float32_packing() == "mkl"  # kept: not timed again
    monkeypatch.setattr(fast, "_PACKING", [])
    assert fast.float32_packing() == "onednn"
    monkeypatch.setattr(fast, "_PACKING", [])
    monkeypatch.setattr(fast, "_can_pack_mkl", lambda: False)
    monkeypatch.setattr(fast, "_best_seconds", lambda run, repeats: pytest.fail("timed with one candidate"))
    assert fast.float32_packing() == "onednn"


@pytest.mark.parametrize("value,expected", [("blas", False), ("BLAS", False)] + ([("onednn", True)] if fast._available() else []))
def test_tunesmith_gemm_fixes_the_choice_without_timing(monkeypatch, value, expected):
    monkeypatch.setattr(fast, "_CHOICE", [])
    monkeypatch.setattr(fast, "_timed_choice", lambda: pytest.fail("timed although the variable chose"))
    monkeypatch.setenv("TUNESMITH_GEMM", value)
    assert fast.onednn_is_faster() is expected


def test_an_unknown_tunesmith_gemm_names_the_variable_and_the_choices(monkeypatch):
    from tunesmith.errors import TunesmithError

    monkeypatch.setattr(fast, "_CHOICE", [])
    monkeypatch.setenv("TUNESMITH_GEMM", "mkl")
    with pytest.raises(TunesmithError, match=r"TUNESMITH_GEMM='mkl'.*onednn, blas or auto"):
        fast.onednn_is_faster()


def test_a_resumed_run_adopts_the_gemm_choices_its_checkpoint_recorded(monkeypatch):
    monkeypatch.delenv("TUNESMITH_GEMM", raising=False)
    monkeypatch.setattr(fast, "_CHOICE", [])
    monkeypatch.setattr(fast, "_PACKING", [])
    monkeypatch.setattr(fast, "_timed_choice", lambda: pytest.fail("timed although the checkpoint chose"))
    monkeypatch.setattr(fast, "_timed_packing", lambda: pytest.fail("timed although the checkpoint chose"))
    fast.adopt_gemm_choices({"float32_gemm": "blas", "float32_packing": "mkl" if fast._can_pack_mkl() else None})
    assert fast.onednn_is_faster() is False
    assert fast.gemm_choices() == {"float32_gemm": "blas", **({"float32_packing": "mkl"} if fast._can_pack_mkl() else {})}
    if fast._can_pack_onednn():
        fast.adopt_gemm_choices({"float32_gemm": "onednn", "float32_packing": "onednn"})
        assert fast.onednn_is_faster() is True and fast.float32_packing() == "onednn"


def test_a_gemm_fixed_by_the_environment_wins_over_the_checkpoint(monkeypatch):
    monkeypatch.setattr(fast, "_CHOICE", [])
    monkeypatch.setenv("TUNESMITH_GEMM", "blas")
    fast.adopt_gemm_choices({"float32_gemm": "onednn"})
    assert fast.onednn_is_faster() is False
    monkeypatch.setattr(fast, "_CHOICE", [])
    monkeypatch.delenv("TUNESMITH_GEMM")
    monkeypatch.setattr(fast, "_timed_choice", lambda: False)
    fast.adopt_gemm_choices({})  # a checkpoint from before the choices were recorded: this process times
    assert fast.onednn_is_faster() is False and fast.gemm_choices() == {"float32_gemm": "blas"}


@pytest.mark.parametrize("value", ["onednn", "blas"])
def test_tunesmith_gemm_fixes_the_packing_library_too(monkeypatch, value):
    monkeypatch.setattr(fast, "_PACKING", [])
    monkeypatch.setattr(fast, "_timed_packing", lambda: pytest.fail("timed although the variable chose"))
    monkeypatch.setenv("TUNESMITH_GEMM", value)
    expected = {"onednn": "onednn" if fast._can_pack_onednn() else None, "blas": "mkl" if fast._can_pack_mkl() else None}
    assert fast.float32_packing() == expected[value]


def test_ranks_of_a_run_pack_with_rank_0s_library(monkeypatch, tmp_path):
    import torch.distributed as dist

    from tunesmith.training import distributed

    monkeypatch.setattr(fast, "_CHOICE", [])
    monkeypatch.setattr(fast, "_PACKING", [])
    monkeypatch.delenv("TUNESMITH_GEMM", raising=False)
    monkeypatch.setattr(fast, "_timed_choice", lambda: True)
    monkeypatch.setattr(fast, "_timed_packing", lambda: "mkl")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        distributed.agree_on_gemm()
    finally:
        dist.destroy_process_group()
    assert fast.onednn_is_faster() is True and fast.float32_packing() == "mkl"
    assert fast.gemm_choices() == {"float32_gemm": "onednn", "float32_packing": "mkl"}


def test_children_get_the_variables_value_or_this_processs_choice(monkeypatch):
    monkeypatch.setattr(fast, "_CHOICE", [])
    monkeypatch.setenv("TUNESMITH_GEMM", "blas")
    assert fast.gemm_for_children() == "blas"
    monkeypatch.setenv("TUNESMITH_GEMM", "auto")  # an explicit auto pins nothing: this process's timing
    monkeypatch.setattr(fast, "_timed_choice", lambda: True)
    assert fast.gemm_for_children() == "onednn"
