"""Token log-probabilities from hidden states through lm_head, in chunks (the book's Code 2.1).

    log p(y_t | y_<t) = (h_t W^T + b)[y_t] - logsumexp_v (h_t W^T + b)[v]

The plain computation builds a [tokens x vocab] logits tensor and autograd keeps it (and its softmax)
for the backward pass: 2048 tokens x 151,936 vocab x 4 bytes is 1.2 GB, twice. Here only the positions
that carry a label are projected, a chunk at a time, and the backward pass recomputes each chunk's
logits instead of storing them, so peak memory is one [chunk x vocab] block.

Entry points:
- `chunked_logprobs`: per-token log-probs with a general backward (any downstream loss: SFT, DPO);
  `chunked_logprobs_at` for hidden rows already gathered at the predicting positions.
- `chunked_logprobs_entropy_at`: log-probs and the distribution's entropy at a sampling temperature (PPO, GRPO).
- `chunked_nll`: the summed negative log-likelihood, whose gradient is computed during the forward
  pass (the loss is a plain sum, so d loss / d logits is known there); backward only rescales it.
  That saves the recomputation, which is what SFT wants.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from tunesmith.algorithms.linear import linear_on_onednn, onednn_applies

IGNORE_INDEX = -100
# A chunk's logits hold at most this many floats (128 MB in fp32), whatever chunk_size asks for:
# 1024 tokens x 151,936 vocab would be 622 MB per chunk.
MAX_CHUNK_ELEMENTS = 2**25
# oneDNN's chunks: 16 MB of fp32 logits, under glibc's largest mmap threshold (32 MB), so freed chunks are reused.
ONEDNN_CHUNK_ELEMENTS = 2**22


def shift_labels(labels: torch.Tensor) -> torch.Tensor:
    """labels[:, t] is predicted from position t - 1: shift left and pad the end with IGNORE_INDEX."""
    return torch.cat([labels[:, 1:], labels.new_full((labels.shape[0], 1), IGNORE_INDEX)], dim=1)


def _chunk_logits(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, chunk_size: int,
                  weight_grad: bool = False) -> Iterator[tuple[slice, torch.Tensor]]:
    """(rows, [rows x vocab] float32 logits) for each chunk of `hidden`, every chunk in one reused buffer.

    float32 because log-softmax in low precision loses too much. One buffer because a chunk is the
    step's largest tensor (131 MB for 1024 x 32,000): above glibc's mmap threshold, so a fresh one per
    chunk would be a fresh mmap, page faults and all. Callers may overwrite each chunk's logits in place.
    oneDNN (algorithms/linear.py) cannot write into a buffer, so there chunks shrink to ONEDNN_CHUNK_ELEMENTS,
    which glibc serves again from the memory the last chunk freed; but not where the caller accumulates
    the head's weight gradient (`weight_grad`): that product runs once per chunk over the whole head.
    """
    if onednn_applies(hidden, weight):
        if not weight_grad:
            chunk_size = max(1, min(chunk_size, ONEDNN_CHUNK_ELEMENTS // weight.shape[0]))
        for start in range(0, len(hidden), chunk_size):
            rows = slice(start, start + chunk_size)
            yield rows, linear_on_onednn(hidden[rows], weight, bias)
        return
    buffer = torch.empty(min(chunk_size, len(hidden)), weight.shape[0], dtype=torch.float32, device=hidden.device)
    for start in range(0, len(hidden), chunk_size):
        rows = slice(start, start + chunk_size)
        logits = buffer[:len(hidden[rows])]
        if weight.dtype == torch.float32 and bias is None:
            torch.mm(hidden[rows], weight.t(), out=logits)
        elif weight.dtype == torch.float32:
            torch.addmm(bias, hidden[rows], weight.t(), out=logits)
        else:
            product = hidden[rows] @ weight.t()
            logits.copy_(product if bias is None else product + bias)
        yield rows, logits


def _times_weight(grad_logits: torch.Tensor, weight: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """out = grad_logits [rows, vocab] W [vocab, hidden] (the head's d/d hidden); returns `out`."""
    if onednn_applies(grad_logits, weight.t()):
        return out.copy_(linear_on_onednn(grad_logits, weight.t()))
    return torch.mm(grad_logits, weight, out=out)


def _accumulate_grads(ctx: torch.autograd.function.FunctionCtx, grad_logits: torch.Tensor,
                      hidden_chunk: torch.Tensor, weight: torch.Tensor, grad_hidden_chunk: torch.Tensor,
                      grads: dict[str, torch.Tensor]) -> None:
    """grad_hidden = grad_logits W; grad_W += grad_logits^T h; grad_b += sum grad_logits."""
    grad_logits = grad_logits.to(weight.dtype)
    _times_weight(grad_logits, weight, out=grad_hidden_chunk)
    if ctx.needs_input_grad[1]:  # in place: a product the size of the head would be a fresh allocation per chunk
        grads["weight"].addmm_(grad_logits.t(), hidden_chunk)
    if ctx.needs_input_grad[2]:
        grads["bias"].add_(grad_logits.sum(0))


def _label_logps_inplace(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(log p[label], exp(logits - max), their row sums) for one chunk, overwriting `logits`.

    One exp pass and no new [chunk x vocab] tensor: the chunk is the largest tensor in the step, and
    allocating a fresh one per chunk (as logsumexp does) costs page faults as well as memory traffic.
    """
    label_logits = logits.gather(1, labels[:, None]).squeeze(1)
    row_max = logits.amax(dim=-1, keepdim=True)
    unnormalised = logits.sub_(row_max).exp_()
    total = unnormalised.sum(dim=-1, keepdim=True)
    return label_logits - row_max.squeeze(1) - total.log().squeeze(1), unnormalised, total


def _softmax_minus_onehot(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(log p[label], softmax - onehot(label)) for one chunk; the second is d(-log p)/d logits. In place."""
    token_logps, probs, total = _label_logps_inplace(logits, labels)
    probs.div_(total)
    probs[torch.arange(len(labels), device=labels.device), labels] -= 1.0
    return token_logps, probs


class _ChunkedLogprobs(torch.autograd.Function):
    """log p(label) per row of `hidden`.

    With a trainable head, backward recomputes each chunk's logits (storing them is what we avoid).
    With a frozen head (LoRA), only d logp / d hidden is needed, and per token it does not depend on the
    loss: it is W[label] - softmax(logits) W. Forward computes it while the chunk's logits are at hand
    ([tokens x hidden], the size of `hidden`), and backward only scales it by each token's incoming
    gradient, which saves the recomputation: a third of the head's matmuls.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, chunk_size):
        token_logps = torch.empty(len(labels), dtype=torch.float32, device=hidden.device)
        frozen_head = ctx.needs_input_grad[0] and not any(ctx.needs_input_grad[1:3])
        dlogp_dhidden = torch.empty_like(hidden) if frozen_head else None
        for rows, logits in _chunk_logits(hidden, weight, bias, chunk_size):
            if frozen_head:
                token_logps[rows], grad_nll = _softmax_minus_onehot(logits, labels[rows])
                _times_weight(grad_nll.to(weight.dtype), weight, out=dlogp_dhidden[rows]).neg_()
            else:
                token_logps[rows] = _label_logps_inplace(logits, labels[rows])[0]
        if frozen_head:
            ctx.save_for_backward(dlogp_dhidden)
        else:
            ctx.save_for_backward(hidden, weight, bias, labels)
        ctx.frozen_head, ctx.chunk_size = frozen_head, chunk_size
        return token_logps

    @staticmethod
    def backward(ctx, grad_logps):
        if ctx.frozen_head:
            (dlogp_dhidden,) = ctx.saved_tensors
            return dlogp_dhidden * grad_logps[:, None].to(dlogp_dhidden.dtype), None, None, None, None
        hidden, weight, bias, labels = ctx.saved_tensors
        grad_hidden = torch.empty_like(hidden)
        grads = {"weight": torch.zeros_like(weight) if ctx.needs_input_grad[1] else None,
                 "bias": torch.zeros_like(bias) if ctx.needs_input_grad[2] else None}
        for rows, logits in _chunk_logits(hidden, weight, bias, ctx.chunk_size, ctx.needs_input_grad[1]):
            _, grad_nll = _softmax_minus_onehot(logits, labels[rows])
            # d logp / d logits = onehot - softmax = -grad_nll, scaled by the incoming gradient per token.
            grad_logits = grad_nll.mul_(-grad_logps[rows, None])
            _accumulate_grads(ctx, grad_logits, hidden[rows], weight, grad_hidden[rows], grads)
        return grad_hidden, grads["weight"], grads["bias"], None, None


def _logps_entropy_inplace(
        logits: torch.Tensor, labels: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(log p[label], entropy, softmax, logits - max, log of the normaliser) for one chunk; `logits` is shifted in place.

    H = -sum p log p = log Z - sum p (z - max), with Z = sum exp(z - max).
    """
    label_logits = logits.gather(1, labels[:, None]).squeeze(1)
    row_max = logits.amax(dim=-1, keepdim=True)
    shifted = logits.sub_(row_max)
    probs = shifted.exp()
    log_total = probs.sum(dim=-1, keepdim=True).log()
    probs.div_(log_total.exp())
    entropy = log_total.squeeze(1) - torch.linalg.vecdot(probs, shifted)
    return label_logits - row_max.squeeze(1) - log_total.squeeze(1), entropy, probs, shifted, log_total


class _ChunkedLogprobsEntropy(torch.autograd.Function):
    """(log p(label), entropy of the whole distribution) per row; backward recomputes each chunk.

    With g the incoming gradients, d/dz of g_lp log p_y + g_H H is
        g_lp (onehot_y - p) - g_H p (log p + H)
    (dH/dz_j = -p_j (log p_j + H)), formed in the recomputed chunk's buffers.

    Without `entropy_grad` (the loss has no entropy term) and with a frozen head (LoRA), forward keeps
    d logp / d hidden, as `_ChunkedLogprobs` does, and backward only scales it: one head matmul fewer.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, chunk_size, entropy_grad):
        token_logps = torch.empty(len(labels), dtype=torch.float32, device=hidden.device)
        entropy = torch.empty_like(token_logps)
        frozen_head = not entropy_grad and ctx.needs_input_grad[0] and not any(ctx.needs_input_grad[1:3])
        dlogp_dhidden = torch.empty_like(hidden) if frozen_head else None
        for rows, logits in _chunk_logits(hidden, weight, bias, chunk_size):
            token_logps[rows], entropy[rows], probs, _, _ = _logps_entropy_inplace(logits, labels[rows])
            if frozen_head:  # d(-log p)/dz = softmax - onehot; d logp / d hidden = -(that) W
                probs[torch.arange(len(probs), device=labels.device), labels[rows]] -= 1.0
                _times_weight(probs.to(weight.dtype), weight, out=dlogp_dhidden[rows]).neg_()
        if frozen_head:
            ctx.save_for_backward(dlogp_dhidden)
            ctx.mark_non_differentiable(entropy)
        else:
            ctx.save_for_backward(hidden, weight, bias, labels, entropy)
        ctx.frozen_head, ctx.chunk_size = frozen_head, chunk_size
        return token_logps, entropy

    @staticmethod
    def backward(ctx, grad_logps, grad_entropy):
        if ctx.frozen_head:
            (dlogp_dhidden,) = ctx.saved_tensors
            return dlogp_dhidden * grad_logps[:, None].to(dlogp_dhidden.dtype), None, None, None, None, None
        hidden, weight, bias, labels, entropy = ctx.saved_tensors
        grad_logps = torch.zeros_like(entropy) if grad_logps is None else grad_logps
        grad_entropy = torch.zeros_like(entropy) if grad_entropy is None else grad_entropy
        grad_hidden = torch.empty_like(hidden)
        grads = {"weight": torch.zeros_like(weight) if ctx.needs_input_grad[1] else None,
                 "bias": torch.zeros_like(bias) if ctx.needs_input_grad[2] else None}
        for rows, logits in _chunk_logits(hidden, weight, bias, ctx.chunk_size, ctx.needs_input_grad[1]):
            _, _, probs, shifted, log_total = _logps_entropy_inplace(logits, labels[rows])
            g_lp, g_h = grad_logps[rows, None], grad_entropy[rows, None]
            # log p + H = shifted - log Z + H; the factor multiplying -p is g_lp + g_H (log p + H)
            factor = shifted.sub_(log_total).add_(entropy[rows, None]).mul_(g_h).add_(g_lp)
            grad_logits = probs.mul_(factor).neg_()
            grad_logits[torch.arange(len(g_lp), device=labels.device), labels[rows]] += g_lp.squeeze(1)
            _accumulate_grads(ctx, grad_logits, hidden[rows], weight, grad_hidden[rows], grads)
        return grad_hidden, grads["weight"], grads["bias"], None, None, None


class _ChunkedNLL(torch.autograd.Function):
    """sum_t -log p(label_t); gradients are computed in forward, backward multiplies by the scalar."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, chunk_size):
        needs = ctx.needs_input_grad
        grad_hidden = torch.empty_like(hidden) if needs[0] else None
        grads = {"weight": torch.zeros_like(weight) if needs[1] else None,
                 "bias": torch.zeros_like(bias) if needs[2] else None}
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for rows, logits in _chunk_logits(hidden, weight, bias, chunk_size, needs[1]):
            token_logps, grad_logits = _softmax_minus_onehot(logits, labels[rows])
            total -= token_logps.sum()
            if any(needs):
                target = grad_hidden[rows] if needs[0] else torch.empty_like(hidden[rows])
                _accumulate_grads(ctx, grad_logits, hidden[rows], weight, target, grads)
        ctx.save_for_backward(grad_hidden, grads["weight"], grads["bias"])
        return total

    @staticmethod
    def backward(ctx, grad_total):
        grad_hidden, grad_weight, grad_bias = ctx.saved_tensors
        scale = lambda grad: None if grad is None else grad * grad_total.to(grad.dtype)  # noqa: E731
        return scale(grad_hidden), scale(grad_weight), scale(grad_bias), None, None


def _labelled_rows(hidden: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Flatten to the positions that predict a label: hidden [M, H], targets [M], mask [batch, seq]."""
    targets = shift_labels(labels)
    mask = targets != IGNORE_INDEX
    return hidden[mask], targets[mask], mask


def chunked_logprobs(hidden: torch.Tensor, lm_head: torch.nn.Linear, labels: torch.Tensor,
                     chunk_size: int = 1024) -> torch.Tensor:
    """Per-token log p(labels) [batch, seq] (0 where the label is IGNORE_INDEX), from hidden [batch, seq, H].

    Position t holds log p(labels[:, t + 1] | ...), i.e. the log-prob of the token that follows it.
    """
    rows, targets, mask = _labelled_rows(hidden, labels)
    token_logps = chunked_logprobs_at(rows, lm_head, targets, chunk_size)
    out = torch.zeros(mask.shape, dtype=token_logps.dtype, device=hidden.device)
    return out.masked_scatter(mask, token_logps)


def chunked_logprobs_at(hidden_rows: torch.Tensor, lm_head: torch.nn.Linear, targets: torch.Tensor,
                        chunk_size: int = 1024) -> torch.Tensor:
    """log p(targets[i] | hidden_rows[i]) [M] for hidden rows [M, H] already gathered at the predicting positions."""
    chunk_size = _rows_per_chunk(chunk_size, lm_head.out_features)
    inputs = _head_inputs(hidden_rows, lm_head)
    with torch.autocast(hidden_rows.device.type, enabled=False):
        return _ChunkedLogprobs.apply(*inputs, targets, chunk_size)


def chunked_logprobs_entropy_at(hidden_rows: torch.Tensor, lm_head: torch.nn.Linear, targets: torch.Tensor,
                                chunk_size: int = 1024,
                                temperature: float = 1.0, entropy_grad: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """(log p(targets[i]), entropy) [M] each, of softmax(logits / temperature) at hidden rows [M, H].

    The temperature is the one tokens were sampled with, so PPO's ratios compare the distributions
    that were actually sampled from: (h W^T + b) / T = (h / T) W^T + b / T. With `entropy_grad=False`
    the entropy is a statistic only (no gradient flows through it), which a frozen head makes cheaper.
    """
    chunk_size = _rows_per_chunk(chunk_size, lm_head.out_features)
    rows, weight, bias = _head_inputs(hidden_rows, lm_head)
    if temperature != 1.0:
        rows, bias = rows / temperature, None if bias is None else bias / temperature
    with torch.autocast(hidden_rows.device.type, enabled=False):
        return _ChunkedLogprobsEntropy.apply(rows, weight, bias, targets, chunk_size, entropy_grad)


def chunked_nll(hidden: torch.Tensor, lm_head: torch.nn.Linear, labels: torch.Tensor,
                chunk_size: int = 1024) -> tuple[torch.Tensor, int]:
    """(sum of -log p over labelled tokens, number of labelled tokens); divide by the count you choose."""
    rows, targets, _ = _labelled_rows(hidden, labels)
    chunk_size = _rows_per_chunk(chunk_size, lm_head.out_features)
    inputs = _head_inputs(rows, lm_head)
    with torch.autocast(hidden.device.type, enabled=False):
        nll_sum = _ChunkedNLL.apply(*inputs, targets, chunk_size)
    return nll_sum, len(targets)


def _rows_per_chunk(chunk_size: int, vocab_size: int) -> int:
    """Shrink the chunk so one chunk's logits stay under MAX_CHUNK_ELEMENTS, however large the vocab."""
    return max(1, min(chunk_size, MAX_CHUNK_ELEMENTS // vocab_size))


def _head_inputs(rows: torch.Tensor,
                 lm_head: torch.nn.Linear) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(rows, weight, bias) in one dtype for the custom functions, which do their own matmuls.

    Under autocast that is the autocast dtype (so full fine-tuning's fp32 head still runs its matmuls in
    bf16); otherwise the hidden states' dtype. The casts are differentiable and free when dtypes match.
    Without grad mode (evaluation) everything is detached, so `_ChunkedNLL` skips its gradient work.
    """
    device_type = rows.device.type
    dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else rows.dtype
    inputs = (rows.to(dtype), lm_head.weight.to(dtype), None if lm_head.bias is None else lm_head.bias.to(dtype))
    if not torch.is_grad_enabled():
        inputs = tuple(None if t is None else t.detach() for t in inputs)
    return inputs
