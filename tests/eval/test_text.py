"""Text metrics against their reference implementations: sacreBLEU (BLEU, chrF), rouge-score (ROUGE) and
the official SQuAD evaluation rules, on perturbed Shakespeare lines."""

import math
import random

import pytest
from rouge_score.rouge_scorer import RougeScorer
from sacrebleu.metrics import BLEU, CHRF
from sacrebleu.tokenizers.tokenizer_13a import Tokenizer13a

from lmforge.eval import bleu, chrf, normalize_answer, perplexity, rouge, squad_exact_match, squad_f1, tokenize_13a

SEEDS = range(4)
TOL = 1e-9
# strings that exercise every 13a rule: entities, numbers with . , -, quotes, brackets, <skipped>
TRICKY = [
    "It costs $3.50, or 1,000 pence -- 1-2 days &amp; nights.",
    'He said: "No!" (twice) &quot;quoted&quot; &lt;tag&gt; <skipped> end-\nof line',
    "e.g. a.b.c, x,y; 10.5% [sic] {brace} ~tilde~ back\\slash @home #1 a/b",
    "   ",
    "",
]


@pytest.fixture(scope="module")
def shakespeare_lines(shakespeare_path) -> list[str]:
    """Tiny Shakespeare's non-empty lines: real verse and prose for the metrics to score."""
    return [line for line in shakespeare_path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _lines(lines: list[str], seed: int, n: int = 300) -> list[str]:
    start = random.Random(seed).randrange(len(lines) - n)
    return lines[start : start + n]


def _perturb(line: str, rng: random.Random) -> str:
    """Drop, repeat, swap or replace words, change case: what a weak model does to a sentence."""
    words = line.split()
    out = []
    for i, word in enumerate(words):
        roll = rng.random()
        if roll < 0.1:
            continue
        if roll < 0.15:
            out += [word, word]
        elif roll < 0.25:
            out.append(rng.choice(["thee", "thou", "lord", "the", "good", "sir,", "."]))
        elif roll < 0.3 and i + 1 < len(words):
            out.append(words[i + 1])
        elif roll < 0.35:
            out.append(word.upper())
        else:
            out.append(word)
    return " ".join(out)


def _corpus(lines: list[str], seed: int) -> tuple[list[str], list[str], list[str]]:
    rng = random.Random(seed)
    refs = _lines(lines, seed) + TRICKY
    hyps = [_perturb(r, rng) for r in refs]
    second_refs = [_perturb(r, rng) for r in refs]
    return hyps, refs, second_refs


def test_13a_tokenizer_matches_sacrebleu(shakespeare_lines):
    theirs = Tokenizer13a()
    for line in _lines(shakespeare_lines, 0, 500) + TRICKY:
        assert tokenize_13a(line) == theirs(line.rstrip()).split(), line


@pytest.mark.parametrize("seed", SEEDS)
def test_bleu_matches_sacrebleu_single_and_multiple_references(shakespeare_lines, seed):
    hyps, refs, second_refs = _corpus(shakespeare_lines, seed)
    expected = BLEU().corpus_score(hyps, [refs])
    ours = bleu(hyps, refs)
    assert ours["score"] == pytest.approx(expected.score, rel=1e-6)
    assert ours["precisions"] == pytest.approx(expected.precisions, rel=1e-6)
    assert (ours["hyp_len"], ours["ref_len"]) == (expected.sys_len, expected.ref_len)
    assert ours["brevity_penalty"] == pytest.approx(expected.bp, rel=1e-9)
    multi = bleu(hyps, [[a, b] for a, b in zip(refs, second_refs, strict=True)])
    assert multi["score"] == pytest.approx(BLEU().corpus_score(hyps, [refs, second_refs]).score, rel=1e-6)


def test_bleu_edge_cases_match_sacrebleu():
    cases = [
        (["the cat"], ["the cat sat on the mat"]),  # no 3- or 4-grams at all: BLEU 0
        (["a b c d e"], ["v w x y z"]),  # no match at all
        (["a b c d e f"], ["a b c d x y"]),  # some matches of every order
        (["a x b y c z d"], ["a b c d"]),  # unigram matches only: exp smoothing on orders 2-4
        ([""], ["something"]),  # empty hypothesis: brevity penalty 0
    ]
    for hyps, refs in cases:
        assert bleu(hyps, refs)["score"] == pytest.approx(BLEU().corpus_score(hyps, [refs]).score, rel=1e-6, abs=0)


@pytest.mark.parametrize("seed", SEEDS)
def test_chrf_and_chrf_plus_plus_match_sacrebleu(shakespeare_lines, seed):
    hyps, refs, second_refs = _corpus(shakespeare_lines, seed)
    assert chrf(hyps, refs) == pytest.approx(CHRF().corpus_score(hyps, [refs]).score, abs=TOL)
    assert chrf(hyps, refs, word_order=2) == pytest.approx(CHRF(word_order=2).corpus_score(hyps, [refs]).score, abs=TOL)
    pairs = [[a, b] for a, b in zip(refs, second_refs, strict=True)]
    assert chrf(hyps, pairs) == pytest.approx(CHRF().corpus_score(hyps, [refs, second_refs]).score, abs=TOL)


@pytest.mark.parametrize("seed", SEEDS)
def test_rouge_matches_rouge_score(shakespeare_lines, seed):
    hyps, refs, second_refs = _corpus(shakespeare_lines, seed)
    hyps += ["Ça coûte 3€ — naïve café", "!!!"]  # non-ASCII letters and punctuation-only text
    refs += ["ca coute 3 naive cafe", "nothing"]
    second_refs += ["", "!!"]
    types = ("rouge1", "rouge2", "rouge3", "rougeL")
    scorer = RougeScorer(list(types), use_stemmer=False)
    single = [scorer.score(r, h) for h, r in zip(hyps, refs, strict=True)]
    multi = [scorer.score_multi([a, b], h) for h, a, b in zip(hyps, refs, second_refs, strict=True)]
    pairs = [[a, b] for a, b in zip(refs, second_refs, strict=True)]
    for ours, theirs in ((rouge(hyps, refs, types), single), (rouge(hyps, pairs, types), multi)):
        for kind in types:
            for field, attr in (("precision", "precision"), ("recall", "recall"), ("f1", "fmeasure")):
                expected = sum(getattr(s[kind], attr) for s in theirs) / len(theirs)
                assert ours[kind][field] == pytest.approx(expected, abs=TOL), (kind, field)


def test_squad_normalisation_and_scores_follow_the_official_script():
    assert normalize_answer("The  Eiffel-Tower!") == "eiffeltower"
    assert normalize_answer("an apple, a pear and THE plum") == "apple pear and plum"
    assert normalize_answer("Theatre anthem") == "theatre anthem"  # articles only as whole words
    predictions = ["the Eiffel Tower", "Paris, France", "", "1889", "blue"]
    gold = [
        ["Eiffel Tower", "tower"],  # EM after normalisation
        ["Paris"],  # F1 = 2 * (1/2 * 1) / (1/2 + 1) = 2/3
        [],  # no-answer question, empty prediction: right
        [""],  # an empty gold answer also means no answer: "1889" is wrong
        "Blue",  # a single gold string
    ]
    assert squad_exact_match(predictions, gold) == pytest.approx(3 / 5)
    assert squad_f1(predictions, gold) == pytest.approx((1 + 2 / 3 + 1 + 0 + 1) / 5)
    assert squad_f1(["the the"], [["a"]]) == 1.0  # both normalise to nothing: the official rule says equal


def test_perplexity_is_exp_of_mean_nll():
    assert perplexity(math.log(42.0)) == pytest.approx(42.0)
    assert perplexity(1e6) == math.inf
    with pytest.raises(ValueError, match="NaN"):
        perplexity(float("nan"))


def test_bad_inputs_raise_clear_errors():
    with pytest.raises(ValueError, match="2 hypotheses but 1 references"):
        bleu(["a", "b"], ["a"])
    with pytest.raises(ValueError, match="sacrebleu's layout"):
        bleu(["a", "b"], [["a", "b"]])
    with pytest.raises(ValueError, match="not one string"):
        chrf("a b", "a b")
    with pytest.raises(ValueError, match="unknown ROUGE types"):
        rouge(["a"], ["a"], types=("rougeLsum",))
    with pytest.raises(ValueError, match="references\\[0\\] must be"):
        bleu(["a"], [[]])
