"""BLEU-4 and ROUGE-1/2/L of a generated answer against its reference: the scores `do_predict` reports.

    BLEU-4    = BP * exp(sum_n 1/4 * log p_n),  BP = 1 if c > r else exp(1 - r / c)  (Papineni et al. 2002)
    ROUGE-N F = 2PR / (P + R) over the sets of n-grams                                 (Lin 2004)
    ROUGE-L F = 2PR / (P + R),  P = LCS / prediction length,  R = LCS / reference length

`similarity_scores` reproduces LLaMA-Factory's ComputeSimilarity (train/sft/metric.py), which is what its
users compare against: BLEU-4 is nltk's `sentence_bleu` with `SmoothingFunction().method3` on the
*characters* of the two texts; ROUGE is `rouge_chinese.Rouge().get_scores(...)["f"]` on jieba words. Each
score is a percentage rounded to 4 decimals; tests/algorithms/test_text_metrics.py checks them against
those libraries. As there, a perfect answer shorter than 4 characters scores BLEU-4 below 100 (an
exact "cba" scores 84) and a one-word answer scores ROUGE-2 0 (it has no bigram).

Differences, on purpose (no dependency on jieba, 37 MB installed):
- `words` follows jieba's rule for non-Chinese text (runs of ASCII letters and digits, with a decimal part
  and a % kept, every other non-space character alone) but has no dictionary, so Chinese is split into
  single characters where jieba finds words, and C++ / C# are three and two tokens. English scores equal
  LLaMA-Factory's.
- rouge_chinese's sentence splitter adds an empty token for every blank line; here blank lines are nothing.
- rouge_chinese adds 1e-8 to P + R in the F denominator; here the F-score is exact (0 when P + R is 0).
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Sequence

BLEU_ORDER = 4
# jieba's finalseg pattern for Latin runs; anything else that is not a space is a token of its own.
_WORD = re.compile(r"[A-Za-z0-9]+(?:\.\d+)?%?|\S")


def words(text: str) -> list[str]:
    """ROUGE tokens: `words("It costs 3.14, ok?") == ["It", "costs", "3.14", ",", "ok", "?"]`."""
    return _WORD.findall(text)


def ngram_counts(tokens: Sequence[str], n: int) -> Counter[tuple[str, ...]]:
    """How often each run of `n` consecutive tokens occurs: the multiset BLEU clips and ROUGE turns into a set."""
    return Counter(tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1))


def bleu4(prediction_tokens: Sequence[str], reference_tokens: Sequence[str]) -> float:
    """Sentence BLEU-4 in [0, 1], as nltk's `sentence_bleu([reference], prediction, smoothing_function=
    SmoothingFunction().method3)`.

    p_n = clipped n-gram matches / prediction n-grams (at least 1 in the denominator). An order with no
    match gets NIST's geometric smoothing, 1 / (2^k * prediction n-grams) with k = 1, 2, ... over such
    orders; no unigram match at all gives 0.

    Worked example, "the cat sat on the mat" against "the cat is on the mat" (c = r = 6, so BP = 1):
    p_1 = 5/6, p_2 = 3/5, p_3 = 1/4, p_4 = 0/3 -> 1/(2 * 3) = 1/6; BLEU = (5/6 * 3/5 * 1/4 * 1/6)^(1/4)
    = (1/48)^(1/4) = 0.379918. And "the cat" against "the cat sat": p = 1, 1, 0/1 -> 1/2, 0/1 -> 1/4,
    BP = exp(1 - 3/2); BLEU = exp(-0.5) * (1/8)^(1/4) = 0.360645.
    """
    matches, totals = [], []
    for n in range(1, BLEU_ORDER + 1):
        predicted, reference = ngram_counts(prediction_tokens, n), ngram_counts(reference_tokens, n)
        matches.append(sum(min(count, reference[gram]) for gram, count in predicted.items()))
        totals.append(max(1, sum(predicted.values())))  # nltk's floor: an answer shorter than n has 0/1
    if matches[0] == 0:
        return 0.0
    log_precision, k = 0.0, 1
    for matched, total in zip(matches, totals):
        if matched == 0:  # NIST geometric sequence smoothing (mteval-v13a.pl)
            precision, k = 1 / (2**k * total), k + 1
        else:
            precision = matched / total
        log_precision += math.log(precision) / BLEU_ORDER
    c, r = len(prediction_tokens), len(reference_tokens)
    brevity_penalty = 1.0 if c > r else math.exp(1 - r / c)
    return brevity_penalty * math.exp(log_precision)


def f_score(precision: float, recall: float) -> float:
    """Harmonic mean (beta = 1, as rouge_chinese); 0 when both are 0."""
    return 2 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0


def rouge_n(prediction_tokens: Sequence[str], reference_tokens: Sequence[str], n: int) -> float:
    """ROUGE-N F-score in [0, 1] over the *sets* of n-grams (repeats count once), as rouge_chinese counts.

    Worked example, "the cat sat on the mat" against "the cat is on the mat": unigram sets of 5 and 5
    share {the, cat, on, mat}: P = R = 4/5, F = 0.8; bigrams share {the cat, on the, the mat}: F = 3/5.
    "a a a" against "a b": sets {a} and {a, b}, P = 1, R = 1/2, F = 2/3.
    """
    predicted, reference = set(ngram_counts(prediction_tokens, n)), set(ngram_counts(reference_tokens, n))
    overlap = len(predicted & reference)
    precision = overlap / len(predicted) if predicted else 0.0
    recall = overlap / len(reference) if reference else 0.0
    return f_score(precision, recall)


def lcs_length(a: Sequence[str], b: Sequence[str]) -> int:
    """Length of the longest common subsequence (dynamic programming, one row of b at a time)."""
    row = [0] * (len(b) + 1)
    for x in a:
        diagonal = 0  # row[j - 1] of the previous row
        for j, y in enumerate(b, start=1):
            above = row[j]
            row[j] = diagonal + 1 if x == y else max(above, row[j - 1])
            diagonal = above
    return row[-1]


def rouge_l(prediction_tokens: Sequence[str], reference_tokens: Sequence[str]) -> float:
    """ROUGE-L F-score in [0, 1]: P = LCS / prediction length, R = LCS / reference length, F = 2PR / (P + R).

    Worked example, "the cat sat on the mat" against "the cat is on the mat": LCS "the cat on the mat"
    = 5, P = R = 5/6, F = 0.833333.
    """
    if not prediction_tokens or not reference_tokens:
        return 0.0
    common = lcs_length(prediction_tokens, reference_tokens)
    return f_score(common / len(prediction_tokens), common / len(reference_tokens))


def similarity_scores(prediction: str, reference: str) -> dict[str, float]:
    """LLaMA-Factory's per-record scores, in percent rounded to 4 decimals: BLEU-4 on characters, ROUGE on
    words."""
    predicted_words, reference_words = words(prediction), words(reference)
    scores = {
        "bleu-4": bleu4(list(prediction), list(reference)),
        "rouge-1": rouge_n(predicted_words, reference_words, 1),
        "rouge-2": rouge_n(predicted_words, reference_words, 2),
        "rouge-l": rouge_l(predicted_words, reference_words),
    }
    return {name: round(100 * value, 4) for name, value in scores.items()}
