"""Metrics for generated text: corpus BLEU and chrF (as sacreBLEU computes them), ROUGE (as Google's
rouge-score computes it), SQuAD exact match and F1 (as the official evaluation scripts), and perplexity.

Scales follow each metric's own convention: BLEU and chrF are 0-100 (what sacreBLEU prints and papers
quote); ROUGE, exact match and F1 are fractions in [0, 1] like every other score in `lmforge.eval`.

References: a list with one entry per hypothesis, each a string or a list of strings (several references).

BLEU (Papineni et al., 2002), sacreBLEU's defaults (Post, 2018): text tokenised with mteval-v13a rules,
modified n-gram precisions p_n (a hypothesis n-gram counts at most as often as it occurs in any one
reference) summed over the corpus for n = 1..4,
    BLEU = BP exp(mean_n log p_n),   BP = 1 if c >= r else exp(1 - r/c),
with c the hypothesis length and r the sum of the reference lengths closest to each hypothesis (the
shorter on a tie). "exp" smoothing (NIST, Chen & Cherry 2014 method 3): the k-th order with no match
gets p_n = 1 / (2^k total_n) instead of 0.

chrF (Popovic, 2015), sacreBLEU 2.x: character n-grams (n = 1..6, whitespace removed) and, for chrF++,
word n-grams (n = 1..word_order); per order, corpus-summed matches give P_n and R_n; P and R are their
means over the orders that occur in both hypothesis and reference, and chrF = 100 (1 + b^2) P R / (b^2 P + R)
with b = 2 (recall counts 2x). With several references each segment uses the one with its best chrF.

ROUGE (Lin, 2004), rouge-score without stemming: lowercased text, every run of characters outside [a-z0-9]
is a separator. ROUGE-N: clipped n-gram overlap / prediction n-grams (P) and / reference n-grams (R);
ROUGE-L: longest common subsequence length / lengths. F = 2PR / (P + R); each pair is scored on its own
(with several references, the one with the best F per type) and the scores are averaged over pairs.

SQuAD (Rajpurkar et al., 2016; 2018): answers are normalised (lowercase, ASCII punctuation removed, the
articles a/an/the removed, whitespace collapsed); EM = normalised prediction equals a gold answer; F1 =
token-overlap F1; both take the best gold answer. An example with no (non-empty) gold answer is a
no-answer question (SQuAD 2.0): right only when the prediction is empty.
"""

from __future__ import annotations

import math
import re
import string
from collections import Counter
from collections.abc import Sequence

# ----------------------------------------------------------------------------------------------------
# references


def _reference_lists(hypotheses: Sequence[str], references: Sequence[str | Sequence[str]]) -> list[list[str]]:
    if isinstance(hypotheses, str) or isinstance(references, str):
        raise ValueError("hypotheses and references are lists of strings (one entry per segment), not one string")
    if len(hypotheses) != len(references):
        hint = "give one entry per segment"
        if references and not isinstance(references[0], str) and len(references[0]) == len(hypotheses):
            hint = "this looks like sacrebleu's layout [stream, ...]; pass one entry per hypothesis (refs, not [refs])"
        raise ValueError(f"{len(hypotheses)} hypotheses but {len(references)} references; {hint}")
    if not hypotheses:
        raise ValueError("no hypotheses to score")
    lists = []
    for i, refs in enumerate(references):
        refs = [refs] if isinstance(refs, str) else list(refs)
        if not refs or not all(isinstance(r, str) for r in refs):
            raise ValueError(f"references[{i}] must be a string or a non-empty list of strings")
        lists.append(refs)
    return lists


def _ngrams(tokens: Sequence, n: int) -> Counter:
    return Counter(tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1))


# ----------------------------------------------------------------------------------------------------
# BLEU

# mteval-v13a: every ASCII punctuation mark except ' - . , becomes its own token; periods and commas are
# split off unless they sit between digits (3.5, 1,000); a dash after a digit is split off (1-2).
_V13A_PUNCTUATION = re.compile("([" + re.escape("".join(sorted(set(string.punctuation) - set("'-.,")))) + "])")
_V13A_STEPS = (
    (_V13A_PUNCTUATION, r" \1 "),
    (re.compile(r"([^0-9])([.,])"), r"\1 \2 "),
    (re.compile(r"([.,])([^0-9])"), r" \1 \2"),
    (re.compile(r"([0-9])(-)"), r"\1 \2 "),
)
_V13A_ENTITIES = (("&quot;", '"'), ("&amp;", "&"), ("&lt;", "<"), ("&gt;", ">"))


def tokenize_13a(line: str) -> list[str]:
    """Tokens of `line` by the mteval-v13a rules (WMT's reference BLEU script), case kept."""
    line = line.rstrip().replace("<skipped>", "").replace("-\n", "").replace("\n", " ")
    for entity, char in _V13A_ENTITIES:
        line = line.replace(entity, char)
    line = f" {line} "
    for pattern, replacement in _V13A_STEPS:
        line = pattern.sub(replacement, line)
    return line.split()


def bleu(hypotheses: Sequence[str], references: Sequence[str | Sequence[str]], *, max_order: int = 4) -> dict:
    """Corpus BLEU, equal to sacrebleu.corpus_bleu with its defaults. Returns {"score" (0-100),
    "precisions" (per order, %), "brevity_penalty", "hyp_len", "ref_len"}."""
    matches, totals = [0] * max_order, [0] * max_order
    hyp_len = ref_len = 0
    for hypothesis, refs in zip(hypotheses, _reference_lists(hypotheses, references), strict=True):
        tokens = tokenize_13a(hypothesis)
        ref_tokens = [tokenize_13a(r) for r in refs]
        hyp_len += len(tokens)
        ref_len += min((abs(len(r) - len(tokens)), len(r)) for r in ref_tokens)[1]
        for n in range(1, max_order + 1):
            best_ref = Counter()
            for r in ref_tokens:
                best_ref |= _ngrams(r, n)  # max count over the references
            hyp_ngrams = _ngrams(tokens, n)
            totals[n - 1] += hyp_ngrams.total()
            matches[n - 1] += (hyp_ngrams & best_ref).total()
    brevity_penalty = 1.0 if hyp_len >= ref_len else (math.exp(1 - ref_len / hyp_len) if hyp_len else 0.0)
    precisions = [0.0] * max_order  # no match at all: BLEU 0, precisions left at 0
    halvings = 1.0
    for n in range(max_order if any(matches) else 0):
        if totals[n] == 0:  # hypotheses shorter than n tokens: BLEU is 0
            break
        if matches[n] == 0:
            halvings *= 2
            precisions[n] = 100.0 / (halvings * totals[n])
        else:
            precisions[n] = 100.0 * matches[n] / totals[n]
    score = 0.0
    if all(precisions):
        score = brevity_penalty * math.exp(sum(math.log(p) for p in precisions) / max_order)
    return {
        "score": score,
        "precisions": precisions,
        "brevity_penalty": brevity_penalty,
        "hyp_len": hyp_len,
        "ref_len": ref_len,
    }


# ----------------------------------------------------------------------------------------------------
# chrF


def _chrf_words(text: str) -> list[str]:
    """chrF++'s word split: on whitespace, with one punctuation mark split off the end (else the start)
    of each word longer than one character."""
    words = []
    for word in text.split():
        if len(word) > 1 and word[-1] in string.punctuation:
            words += [word[:-1], word[-1]]
        elif len(word) > 1 and word[0] in string.punctuation:
            words += [word[0], word[1:]]
        else:
            words.append(word)
    return words


def _chrf_ngrams(text: str, char_order: int, word_order: int) -> list[Counter]:
    chars = "".join(text.split())
    words = _chrf_words(text) if word_order else []
    return [_ngrams(chars, n) for n in range(1, char_order + 1)] + [_ngrams(words, n) for n in range(1, word_order + 1)]


def _chrf_from_stats(stats: Sequence[Sequence[int]], beta: float) -> float:
    """chrF (0-100) from [hyp n-grams, ref n-grams, matches] per order."""
    precisions, recalls = [], []
    for n_hyp, n_ref, n_match in stats:
        if n_hyp > 0 and n_ref > 0:
            precisions.append(n_match / n_hyp)
            recalls.append(n_match / n_ref)
    if not precisions:
        return 0.0
    precision, recall = sum(precisions) / len(precisions), sum(recalls) / len(recalls)
    if precision + recall == 0:
        return 0.0
    return 100 * (1 + beta**2) * precision * recall / (beta**2 * precision + recall)


def chrf(
    hypotheses: Sequence[str],
    references: Sequence[str | Sequence[str]],
    *,
    char_order: int = 6,
    word_order: int = 0,
    beta: float = 2.0,
) -> float:
    """Corpus chrF (0-100), equal to sacrebleu.corpus_chrf with its defaults; word_order=2 gives chrF++."""
    total = [[0, 0, 0] for _ in range(char_order + word_order)]
    for hypothesis, refs in zip(hypotheses, _reference_lists(hypotheses, references), strict=True):
        hyp_ngrams = _chrf_ngrams(hypothesis, char_order, word_order)
        best, best_score = None, -1.0
        for ref in refs:
            stats = [
                [h.total() if r else 0, r.total(), (h & r).total()]  # no reference n-grams: nothing to miss
                for h, r in zip(hyp_ngrams, _chrf_ngrams(ref, char_order, word_order), strict=True)
            ]
            score = _chrf_from_stats(stats, beta)
            if score > best_score:
                best, best_score = stats, score
        for order, counts in zip(total, best, strict=True):
            for j in range(3):
                order[j] += counts[j]
    return _chrf_from_stats(total, beta)


# ----------------------------------------------------------------------------------------------------
# ROUGE

ROUGE_TYPE = re.compile(r"rouge([1-9]|L)$")
_NOT_ALPHANUMERIC = re.compile(r"[^a-z0-9]+")


def _rouge_tokens(text: str) -> list[str]:
    return _NOT_ALPHANUMERIC.sub(" ", text.lower()).split()


def _lcs_length(a: Sequence[str], b: Sequence[str]) -> int:
    """Longest common subsequence by dynamic programming, one row at a time."""
    previous = [0] * (len(b) + 1)
    for x in a:
        current = [0]
        for j, y in enumerate(b):
            current.append(previous[j] + 1 if x == y else max(previous[j + 1], current[j]))
        previous = current
    return previous[-1]


def _rouge_pair(kind: str, prediction: list[str], reference: list[str]) -> tuple[float, float, float]:
    if kind == "rougeL":
        if not prediction or not reference:
            return 0.0, 0.0, 0.0
        overlap = _lcs_length(reference, prediction)
        precision, recall = overlap / len(prediction), overlap / len(reference)
    else:
        n = int(kind[len("rouge") :])
        pred_ngrams, ref_ngrams = _ngrams(prediction, n), _ngrams(reference, n)
        overlap = (pred_ngrams & ref_ngrams).total()
        precision = overlap / max(pred_ngrams.total(), 1)
        recall = overlap / max(ref_ngrams.total(), 1)
    f1 = 2 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0
    return precision, recall, f1


def rouge(
    predictions: Sequence[str],
    references: Sequence[str | Sequence[str]],
    types: Sequence[str] = ("rouge1", "rouge2", "rougeL"),
) -> dict[str, dict[str, float]]:
    """{type: {"precision", "recall", "f1"}} averaged over the pairs; types are "rouge1".."rouge9" and
    "rougeL". Matches rouge_score.rouge_scorer.RougeScorer(types, use_stemmer=False) (score_multi for
    several references)."""
    bad = [t for t in types if not ROUGE_TYPE.match(t)]
    if bad or not types:
        raise ValueError(f"unknown ROUGE types {bad}; use rouge1..rouge9 or rougeL")
    reference_lists = _reference_lists(predictions, references)
    sums = {kind: [0.0, 0.0, 0.0] for kind in types}
    for prediction, refs in zip(predictions, reference_lists, strict=True):
        pred_tokens, ref_tokens = _rouge_tokens(prediction), [_rouge_tokens(r) for r in refs]
        for kind in types:
            scores = [_rouge_pair(kind, pred_tokens, r) for r in ref_tokens]
            best = max(range(len(scores)), key=lambda i: (scores[i][2], -i))  # first of the best F
            for j in range(3):
                sums[kind][j] += scores[best][j]
    n = len(predictions)
    return {kind: {"precision": p / n, "recall": r / n, "f1": f / n} for kind, (p, r, f) in sums.items()}


# ----------------------------------------------------------------------------------------------------
# SQuAD

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = str.maketrans("", "", string.punctuation)


def normalize_answer(text: str) -> str:
    """SQuAD's answer normalisation: lowercase, drop punctuation, drop articles, collapse whitespace."""
    return " ".join(_ARTICLES.sub(" ", text.lower().translate(_PUNCTUATION)).split())


def _gold_lists(predictions: Sequence[str], gold_answers: Sequence[str | Sequence[str]]) -> list[list[str]]:
    """Normalised gold answers per example; [""] for a no-answer question."""
    if len(predictions) != len(gold_answers):
        raise ValueError(f"{len(predictions)} predictions but {len(gold_answers)} gold answer lists; one per question")
    if not predictions:
        raise ValueError("no predictions to score")
    golds = []
    for answers in gold_answers:
        answers = [answers] if isinstance(answers, str) else answers
        golds.append([a for a in map(normalize_answer, answers) if a] or [""])
    return golds


def _token_f1(prediction: str, gold: str) -> float:
    pred_tokens, gold_tokens = prediction.split(), gold.split()
    if not pred_tokens or not gold_tokens:
        return float(pred_tokens == gold_tokens)
    same = (Counter(pred_tokens) & Counter(gold_tokens)).total()
    if same == 0:
        return 0.0
    precision, recall = same / len(pred_tokens), same / len(gold_tokens)
    return 2 * precision * recall / (precision + recall)


def squad_exact_match(predictions: Sequence[str], gold_answers: Sequence[str | Sequence[str]]) -> float:
    """Fraction of questions whose normalised prediction equals one of the normalised gold answers.
    gold_answers[i] is the list of reference answers of question i (empty: no answer, predict "")."""
    golds = _gold_lists(predictions, gold_answers)
    hits = [max(normalize_answer(p) == g for g in gs) for p, gs in zip(predictions, golds, strict=True)]
    return sum(hits) / len(hits)


def squad_f1(predictions: Sequence[str], gold_answers: Sequence[str | Sequence[str]]) -> float:
    """Mean over questions of the best token-overlap F1 against the gold answers (normalised tokens)."""
    golds = _gold_lists(predictions, gold_answers)
    scores = [max(_token_f1(normalize_answer(p), g) for g in gs) for p, gs in zip(predictions, golds, strict=True)]
    return sum(scores) / len(scores)


# ----------------------------------------------------------------------------------------------------
# perplexity


def perplexity(mean_nll: float) -> float:
    """exp(mean negative log-likelihood per token, in nats); inf when that overflows a float."""
    if math.isnan(mean_nll):
        raise ValueError("mean_nll is NaN; the loss diverged or was averaged over zero tokens")
    try:
        return math.exp(mean_nll)
    except OverflowError:
        return math.inf
