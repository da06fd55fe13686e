"""Chunked lm_head log-probs equal the plain [tokens x vocab] computation, values and gradients."""

import pytest
import torch

from tunesmith.algorithms.logprobs import IGNORE_INDEX, chunked_logprobs, chunked_nll


def plain_logprobs(hidden, head, labels):
    """The textbook computation: full logits, log-softmax, gather the next token."""
    logits = head(hidden)[:, :-1].float()
    targets = labels[:, 1:]
    mask = targets != IGNORE_INDEX
    logps = torch.log_softmax(logits, -1).gather(2, targets.clamp(min=0)[..., None]).squeeze(-1)
    return logps * mask


@pytest.fixture
def setup(gemm):
    torch.manual_seed(0)
    head = torch.nn.Linear(16, 37, bias=True)
    hidden = torch.randn(3, 9, 16, requires_grad=True)
    labels = torch.randint(0, 37, (3, 9))
    labels[0, :4] = IGNORE_INDEX
    labels[2, 6:] = IGNORE_INDEX
    return head, hidden, labels


@pytest.mark.parametrize("chunk_size", [1, 4, 1000])
def test_chunked_logprobs_match_plain(setup, chunk_size):
    head, hidden, labels = setup
    weights = torch.randn(3, 8)
    expected = plain_logprobs(hidden, head, labels)
    (expected * weights).sum().backward()
    grads = [t.grad.clone() for t in (hidden, head.weight, head.bias)]
    for t in (hidden, head.weight, head.bias):
        t.grad = None
    got = chunked_logprobs(hidden, head, labels, chunk_size)
    assert torch.allclose(got[:, :-1], expected, atol=1e-5)
    assert torch.all(got[:, -1] == 0)
    (got[:, :-1] * weights).sum().backward()
    for value, reference in zip((hidden.grad, head.weight.grad, head.bias.grad), grads):
        assert torch.allclose(value, reference, atol=1e-5)


@pytest.mark.parametrize("chunk_size", [1, 5, 1000])
def test_chunked_nll_matches_plain(setup, chunk_size):
    head, hidden, labels = setup
    expected = -plain_logprobs(hidden, head, labels).sum()
    (0.37 * expected).backward()
    grads = [t.grad.clone() for t in (hidden, head.weight, head.bias)]
    for t in (hidden, head.weight, head.bias):
        t.grad = None
    nll, count = chunked_nll(hidden, head, labels, chunk_size)
    assert count == int((labels[:, 1:] != IGNORE_INDEX).sum())
    assert torch.allclose(nll, expected, atol=1e-4)
    (0.37 * nll).backward()
    for value, reference in zip((hidden.grad, head.weight.grad, head.bias.grad), grads):
        assert torch.allclose(value, reference, atol=1e-5)


@pytest.mark.parametrize("chunk_size", [1, 4, 1000])
def test_chunked_logprobs_frozen_head_gradient_matches_plain(setup, chunk_size):
    """The LoRA path: d logp / d hidden computed in forward, scaled in backward, equals autograd's."""
    head, hidden, labels = setup
    head.requires_grad_(False)
    weights = torch.randn(3, 8)
    (plain_logprobs(hidden, head, labels) * weights).sum().backward()
    expected, hidden.grad = hidden.grad.clone(), None
    got = chunked_logprobs(hidden, head, labels, chunk_size)
    (got[:, :-1] * weights).sum().backward()
    assert head.weight.grad is None
    torch.testing.assert_close(hidden.grad, expected, atol=1e-5, rtol=0)


def test_frozen_head_gets_no_gradient(setup):
    head, hidden, labels = setup
    head.requires_grad_(False)
    nll, _ = chunked_nll(hidden, head, labels, 4)
    nll.backward()
    assert head.weight.grad is None and hidden.grad is not None


def test_autocast_runs_the_head_in_bf16_with_fp32_gradients(setup):
    head, hidden, labels = setup
    expected = -plain_logprobs(hidden, head, labels).sum()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        nll, _ = chunked_nll(hidden, head, labels, 4)
    assert nll != expected and torch.allclose(nll, expected, rtol=2e-2)  # bf16 matmuls, fp32 softmax
    nll.backward()
    assert hidden.grad.dtype == torch.float32 and head.weight.grad.dtype == torch.float32


def test_no_grad_evaluation_skips_gradient_work(setup):
    head, hidden, labels = setup
    with torch.no_grad():
        nll, _ = chunked_nll(hidden, head, labels, 4)
    assert not nll.requires_grad
    assert torch.allclose(nll, -plain_logprobs(hidden, head, labels).sum(), atol=1e-4)
