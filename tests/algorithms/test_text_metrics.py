"""BLEU-4 and ROUGE: hand-derived numbers (see the docstrings in text_metrics); when installed, the libraries
LLaMA-Factory uses (nltk, rouge_chinese, jieba) on random token sequences and in its exact scoring recipe."""

import random

import pytest

from tunesmith.algorithms.text_metrics import bleu4, lcs_length, rouge_l, rouge_n, similarity_scores, words

CAT = "the cat sat on the mat".split()
REF = "the cat is on the mat".split()


def test_bleu4_hand_derived():
    assert bleu4(CAT, REF) == pytest.approx((5 / 6 * 3 / 5 * 1 / 4 * 1 / 6) ** 0.25)  # 0.379918
    short = bleu4(["the", "cat"], ["the", "cat", "sat"])  # p3 = 1/2, p4 = 1/4 smoothed, BP = exp(-1/2)
    assert short == pytest.approx(2.718281828459045 ** -0.5 * (1 / 8) ** 0.25)  # 0.360645
    assert bleu4(CAT, CAT) == 1.0
    assert bleu4(["x", "y"], REF) == 0.0  # no unigram match
    assert bleu4([], REF) == 0.0 and bleu4(CAT, []) == 0.0


def test_rouge_hand_derived():
    assert rouge_n(CAT, REF, 1) == pytest.approx(0.8)
    assert rouge_n(CAT, REF, 2) == pytest.approx(0.6)
    assert rouge_l(CAT, REF) == pytest.approx(5 / 6)
    assert rouge_n(["a", "a", "a"], ["a", "b"], 1) == pytest.approx(2 / 3)  # sets: repeats count once
    assert rouge_n(["a"], ["a"], 2) == 0.0  # no bigram in either
    assert rouge_l([], REF) == rouge_n([], REF, 1) == 0.0
    assert lcs_length("ABCBDAB", "BDCABA") == 4  # CLRS's example


def test_words_follow_jieba_on_latin_text_and_split_cjk_into_characters():
    assert words("It costs 3.14, 50% off!\n") == ["It", "costs", "3.14", ",", "50%", "off", "!"]
    assert words("don't e-mail") == ["don", "'", "t", "e", "-", "mail"]
    assert words("我是AI助手。") == ["我", "是", "AI", "助", "手", "。"]


def test_similarity_scores_are_percentages_with_bleu_on_characters():
    assert similarity_scores("Hello there!", "Hello there!") == {"bleu-4": 100.0, "rouge-1": 100.0,
                                                                 "rouge-2": 100.0, "rouge-l": 100.0}
    scores = similarity_scores("the cat sat on the mat", "the cat is on the mat")
    assert scores["rouge-1"] == 80.0 and scores["rouge-l"] == pytest.approx(83.3333)
    characters = bleu4(list("the cat sat on the mat"), list("the cat is on the mat"))
    assert scores["bleu-4"] == round(100 * characters, 4)
    assert similarity_scores("", "Blue.") == {"bleu-4": 0.0, "rouge-1": 0.0, "rouge-2": 0.0, "rouge-l": 0.0}


def random_pairs(count: int, seed: int = 0):
    """Token sequences over a 5-token vocabulary (so n-grams repeat and overlap), lengths 0-14."""
    rng = random.Random(seed)
    vocab = ["a", "b", "c", "d", "e"]
    for _ in range(count):
        yield rng.choices(vocab, k=rng.randint(0, 14)), rng.choices(vocab, k=rng.randint(0, 14))


def test_bleu4_matches_nltk_method3():
    bleu_score = pytest.importorskip("nltk.translate.bleu_score")
    smoothing = bleu_score.SmoothingFunction().method3
    for prediction, reference in random_pairs(500):
        expected = bleu_score.sentence_bleu([reference], prediction, smoothing_function=smoothing)
        assert bleu4(prediction, reference) == pytest.approx(expected, abs=1e-12), (prediction, reference)


def test_rouge_matches_rouge_chinese():
    rouge = pytest.importorskip("rouge_chinese").Rouge()
    for prediction, reference in random_pairs(500, seed=1):
        if not prediction or not reference:
            continue  # rouge_chinese raises on empty text; LLaMA-Factory scores it 0 before calling it
        expected = rouge.get_scores(" ".join(prediction), " ".join(reference))[0]
        got = {"rouge-1": rouge_n(prediction, reference, 1), "rouge-2": rouge_n(prediction, reference, 2),
               "rouge-l": rouge_l(prediction, reference)}
        for name, value in got.items():
            assert value == pytest.approx(expected[name]["f"], abs=1e-7), (name, prediction, reference)


def llama_factory_scores(prediction: str, reference: str) -> dict[str, float]:
    """LLaMA-Factory 0.9's ComputeSimilarity for one record (src/llamafactory/train/sft/metric.py)."""
    jieba = pytest.importorskip("jieba")
    bleu_score = pytest.importorskip("nltk.translate.bleu_score")
    rouge_chinese = pytest.importorskip("rouge_chinese")
    hypothesis, label = list(jieba.cut(prediction)), list(jieba.cut(reference))
    if len(" ".join(hypothesis).split()) == 0 or len(" ".join(label).split()) == 0:
        result = {"rouge-1": {"f": 0.0}, "rouge-2": {"f": 0.0}, "rouge-l": {"f": 0.0}}
    else:
        result = rouge_chinese.Rouge().get_scores(" ".join(hypothesis), " ".join(label))[0]
    scores = {name: round(value["f"] * 100, 4) for name, value in result.items()}
    bleu = bleu_score.sentence_bleu([list(reference)], list(prediction),
                                    smoothing_function=bleu_score.SmoothingFunction().method3)
    return {**scores, "bleu-4": round(bleu * 100, 4)}


def test_similarity_scores_equal_llama_factory_on_english():
    sentences = ["I am Tunesmith, an AI assistant developed by tunesmith-dev. How can I help you today?",
                 "Hello! I am Tunesmith, an AI assistant. How may I help you?",
                 "It costs 3.14 dollars, 50% off.",
                 "Blue.", "One, two, three.", "", "the the the", "Don't e-mail me; call (555) 010-0199!"]
    for prediction in sentences:
        for reference in sentences:
            expected = llama_factory_scores(prediction, reference)
            got = similarity_scores(prediction, reference)
            assert got == expected, (prediction, reference)
