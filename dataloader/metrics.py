"""CrossFit's evaluation metrics, each scaled so that the maximum is 1.0.

Every metric takes ``(predictions, references)`` where ``references[i]`` holds all gold answers of
example ``i``. Metrics over single examples (ACC, EM, QA-F1, Rouge-L) take the best score over the
gold answers; corpus-level metrics (Classification-F1, Matthew-Correlation, Pearson-Correlation)
use the first gold answer, as CrossFit does.

Decisions where CrossFit leaves a gap (all chosen so that scoring the gold answers against
themselves always gives the maximum):

* Strings are stripped of surrounding whitespace before any comparison.
* Classification-F1 and Matthew-Correlation compare labels case-sensitively (CrossFit passes the raw
  strings to sklearn); ACC is case-insensitive, as in CrossFit.
* Matthew-Correlation works on the string labels (multi-class MCC); for CrossFit's binary glue-cola
  it equals CrossFit's value whenever the predictions use the two gold labels.
* QA-F1 and Rouge-L: when prediction and gold both have no tokens (e.g. gold "." or non-Latin text
  that the tokenizer drops), the score is 1.0 if the stripped strings are equal (SQuAD v2 convention),
  else 0.0.
* Pearson-Correlation: a prediction that is not a finite number is replaced by the mean of the gold
  values, so it adds no signal and pulls the score towards 0 instead of crashing.
* Matthew- and Pearson-Correlation: predictions identical to the gold labels score 1.0 even when the
  gold is constant (correlation undefined); otherwise an undefined correlation scores 0.0.
"""

from __future__ import annotations

import functools
import math
import re
import string
import warnings
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import numpy as np

from utils.errors import UserInputError

MetricFn = Callable[[list[str], list[list[str]]], float]

METRICS: dict[str, MetricFn] = {}


def register(name: str) -> Callable[[MetricFn], MetricFn]:
    """Add a metric to METRICS under ``name``; the registered version validates its inputs."""

    def decorate(fn: MetricFn) -> MetricFn:
        @functools.wraps(fn)
        def checked(predictions: list[str], references: list[list[str]]) -> float:
            _check_inputs(predictions, references)
            return float(fn(list(predictions), [list(refs) for refs in references]))

        if name in METRICS:
            raise ValueError(f"metric {name!r} registered twice")
        METRICS[name] = checked
        return checked

    return decorate


def _check_inputs(predictions: list[str], references: list[list[str]]) -> None:
    if isinstance(predictions, str):
        raise TypeError("predictions must be a list of strings, not one string")
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} reference lists")
    if not predictions:
        raise ValueError("nothing to score: no predictions")
    for i, refs in enumerate(references):
        if isinstance(refs, str) or len(refs) == 0:
            raise ValueError(f"references[{i}] must be a non-empty list of gold answers")


def score(metric: str, predictions: list[str], references: list[list[str]]) -> float:
    """Score predictions with a metric named as in METRICS."""
    if metric not in METRICS:
        raise UserInputError(f"unknown metric {metric!r}; known metrics: {', '.join(sorted(METRICS))}")
    return METRICS[metric](predictions, references)


# --- per-example metrics ---------------------------------------------------------------------------

_PUNCTUATION = set(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b")


def normalize_answer(text: str) -> str:
    """SQuAD normalisation: lowercase, drop punctuation and articles, collapse whitespace."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def _mean_best(
    predictions: list[str], references: list[list[str]], one: Callable[[str, str], float]
) -> float:
    """Per-example score, best over that example's gold answers, averaged over examples."""
    pairs = zip(predictions, references, strict=True)
    best = [max(one(pred, gold) for gold in golds) for pred, golds in pairs]
    return float(np.mean(best))


def _accuracy_one(prediction: str, gold: str) -> float:
    return float(prediction.strip().lower() == gold.strip().lower())


def _exact_match_one(prediction: str, gold: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(gold))


def _f1_one(prediction: str, gold: str) -> float:
    pred_tokens = normalize_answer(prediction).split()
    gold_tokens = normalize_answer(gold).split()
    if not pred_tokens or not gold_tokens:
        return float(not pred_tokens and not gold_tokens and prediction.strip() == gold.strip())
    same = sum((Counter(pred_tokens) & Counter(gold_tokens)).values())
    if same == 0:
        return 0.0
    precision = same / len(pred_tokens)
    recall = same / len(gold_tokens)
    return 2 * precision * recall / (precision + recall)


@functools.cache
def _rouge_scorer():  # untyped: rouge_score ships no stubs
    from rouge_score import rouge_scorer  # imported lazily: only summarisation tasks need it

    return rouge_scorer.RougeScorer(["rougeL"])


def _rouge_l_one(prediction: str, gold: str) -> float:
    if prediction.strip() == gold.strip():
        return 1.0  # also covers texts the tokenizer reduces to nothing
    return float(_rouge_scorer().score(gold, prediction)["rougeL"].fmeasure)


@register("ACC")
def accuracy(predictions: list[str], references: list[list[str]]) -> float:
    """Case-insensitive exact match, best over gold answers."""
    return _mean_best(predictions, references, _accuracy_one)


@register("EM")
def exact_match(predictions: list[str], references: list[list[str]]) -> float:
    """SQuAD-normalised exact match, best over gold answers."""
    return _mean_best(predictions, references, _exact_match_one)


@register("QA-F1")
def qa_f1(predictions: list[str], references: list[list[str]]) -> float:
    """SQuAD token F1 on normalised tokens, best over gold answers, averaged over examples."""
    return _mean_best(predictions, references, _f1_one)


@register("Rouge-L")
def rouge_l(predictions: list[str], references: list[list[str]]) -> float:
    """Rouge-L F-measure, best over gold answers, averaged over examples."""
    return _mean_best(predictions, references, _rouge_l_one)


# --- corpus-level metrics (first gold answer) ------------------------------------------------------


@register("Classification-F1")
def classification_f1(predictions: list[str], references: list[list[str]]) -> float:
    """Macro F1 over the union of gold and predicted labels (case-sensitive, stripped)."""
    from sklearn.metrics import f1_score

    gold = [refs[0].strip() for refs in references]
    pred = [p.strip() for p in predictions]
    return float(f1_score(gold, pred, average="macro", zero_division=0))


@register("Matthew-Correlation")
def matthews_correlation(predictions: list[str], references: list[list[str]]) -> float:
    """Matthews correlation on string labels; 1.0 for a perfect match even with constant gold."""
    from sklearn.metrics import matthews_corrcoef

    gold = [refs[0].strip() for refs in references]
    pred = [p.strip() for p in predictions]
    if pred == gold:
        return 1.0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # undefined MCC (a constant side) is reported as 0.0
        value = matthews_corrcoef(gold, pred)
    return 0.0 if math.isnan(value) else float(value)


def _as_float(text: str) -> float | None:
    try:
        value = float(text.strip())
    except ValueError:
        return None
    return value if math.isfinite(value) else None


@register("Pearson-Correlation")
def pearson_correlation(predictions: list[str], references: list[list[str]]) -> float:
    """Pearson r between numeric predictions and gold; non-numbers become the gold mean."""
    from scipy.stats import pearsonr

    gold_values = []
    for i, refs in enumerate(references):
        value = _as_float(refs[0])
        if value is None:
            raise UserInputError(
                f"Pearson-Correlation needs numeric gold answers; example {i} has {refs[0]!r}"
            )
        gold_values.append(value)
    gold = np.array(gold_values)
    fallback = float(gold.mean())
    parsed = [_as_float(p) for p in predictions]
    pred = np.array([fallback if v is None else v for v in parsed])
    if all(v is not None for v in parsed) and np.array_equal(pred, gold):
        return 1.0
    if len(gold) < 2 or np.all(gold == gold[0]) or np.all(pred == pred[0]):
        return 0.0  # correlation undefined
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        value = pearsonr(pred, gold)[0]
    return 0.0 if math.isnan(value) else float(value)


# --- which metric scores which task ----------------------------------------------------------------

_BLIMP = [
    "anaphor_gender_agreement",
    "anaphor_number_agreement",
    "determiner_noun_agreement_with_adj_irregular_1",
    "ellipsis_n_bar_1",
    "ellipsis_n_bar_2",
    "existential_there_quantifiers_1",
    "irregular_past_participle_adjectives",
    "sentential_negation_npi_licensor_present",
    "sentential_negation_npi_scope",
    "wh_questions_object_gap",
]
_ETHOS = ["directed_vs_generalized", "disability", "gender", "national_origin", "race", "religion",
          "sexual_orientation"]  # fmt: skip
_TWEET_EVAL = ["emoji", "emotion", "hate", "irony", "offensive", "sentiment", "stance_abortion",
               "stance_atheism", "stance_climate", "stance_feminist", "stance_hillary"]  # fmt: skip

# CrossFit's task -> metric table (the metric each task's few-shot split is scored with in CrossFit).
TASK_METRICS: dict[str, str] = {
    "acronym_identification": "EM",
    "ade_corpus_v2-classification": "Classification-F1",
    "ade_corpus_v2-dosage": "EM",
    "ade_corpus_v2-effect": "EM",
    "adversarialqa": "QA-F1",
    "aeslc": "Rouge-L",
    "ag_news": "Classification-F1",
    "ai2_arc": "ACC",
    "amazon_polarity": "Classification-F1",
    "anli": "Classification-F1",
    "app_reviews": "Pearson-Correlation",
    "aqua_rat": "ACC",
    "art": "ACC",
    "aslg_pc12": "EM",
    "biomrc": "QA-F1",
    **{f"blimp-{name}": "ACC" for name in _BLIMP},
    "boolq": "ACC",
    "break-QDMR": "EM",
    "break-QDMR-high-level": "EM",
    "circa": "Classification-F1",
    "climate_fever": "Classification-F1",
    "codah": "Classification-F1",
    "common_gen": "Rouge-L",
    "commonsense_qa": "ACC",
    "cos_e": "Rouge-L",
    "cosmos_qa": "ACC",
    "crawl_domain": "EM",
    "crows_pairs": "ACC",
    "dbpedia_14": "Classification-F1",
    "definite_pronoun_resolution": "ACC",
    "discovery": "Classification-F1",
    "dream": "ACC",
    "duorc": "QA-F1",
    "e2e_nlg_cleaned": "Rouge-L",
    "eli5-askh": "Rouge-L",
    "eli5-asks": "Rouge-L",
    "eli5-eli5": "Rouge-L",
    "emo": "Classification-F1",
    "emotion": "Classification-F1",
    "empathetic_dialogues": "Rouge-L",
    **{f"ethos-{name}": "Classification-F1" for name in _ETHOS},
    "financial_phrasebank": "Classification-F1",
    "freebase_qa": "EM",
    "gigaword": "Rouge-L",
    "glue-cola": "Matthew-Correlation",
    "glue-mnli": "ACC",
    "glue-mrpc": "ACC",
    "glue-qnli": "ACC",
    "glue-qqp": "ACC",
    "glue-rte": "ACC",
    "glue-sst2": "ACC",
    "glue-wnli": "ACC",
    "google_wellformed_query": "ACC",
    "hate_speech18": "Classification-F1",
    "hate_speech_offensive": "Classification-F1",
    "hatexplain": "Classification-F1",
    "health_fact": "Classification-F1",
    "hellaswag": "ACC",
    "hotpot_qa": "QA-F1",
    "imdb": "Classification-F1",
    "jeopardy": "EM",
    "kilt_ay2": "EM",
    "kilt_fever": "ACC",
    "kilt_hotpotqa": "EM",
    "kilt_nq": "EM",
    "kilt_trex": "EM",
    "kilt_wow": "Rouge-L",
    "kilt_zsre": "EM",
    "lama-conceptnet": "EM",
    "lama-google_re": "EM",
    "lama-squad": "EM",
    "lama-trex": "EM",
    "liar": "Classification-F1",
    "limit": "EM",
    "math_qa": "ACC",
    "mc_taco": "ACC",
    "medical_questions_pairs": "ACC",
    "mocha": "Pearson-Correlation",
    "multi_news": "Rouge-L",
    "numer_sense": "EM",
    "onestop_english": "Classification-F1",
    "openbookqa": "ACC",
    "paws": "Classification-F1",
    "piqa": "ACC",
    "poem_sentiment": "Classification-F1",
    "proto_qa": "EM",
    "qa_srl": "EM",
    "qasc": "ACC",
    "quail": "ACC",
    "quarel": "ACC",
    "quartz-no_knowledge": "ACC",
    "quartz-with_knowledge": "ACC",
    "quoref": "QA-F1",
    "race-high": "ACC",
    "race-middle": "ACC",
    "reddit_tifu-title": "Rouge-L",
    "reddit_tifu-tldr": "Rouge-L",
    "ropes": "QA-F1",
    "rotten_tomatoes": "Classification-F1",
    "samsum": "Rouge-L",
    "scicite": "Classification-F1",
    "sciq": "ACC",
    "scitail": "Classification-F1",
    "search_qa": "EM",
    "sick": "Classification-F1",
    "sms_spam": "Classification-F1",
    "social_i_qa": "ACC",
    "spider": "EM",
    "squad-no_context": "EM",
    "squad-with_context": "QA-F1",
    "superglue-cb": "ACC",
    "superglue-copa": "ACC",
    "superglue-multirc": "EM",
    "superglue-record": "QA-F1",
    "superglue-rte": "ACC",
    "superglue-wic": "ACC",
    "superglue-wsc": "ACC",
    "swag": "ACC",
    "tab_fact": "Classification-F1",
    "trec": "Classification-F1",
    "trec-finegrained": "Classification-F1",
    **{f"tweet_eval-{name}": "Classification-F1" for name in _TWEET_EVAL},
    "tweet_qa": "QA-F1",
    "web_questions": "EM",
    "wiki_auto": "Classification-F1",
    "wiki_bio": "Rouge-L",
    "wiki_qa": "Classification-F1",
    "wiki_split": "Rouge-L",
    "wikisql": "EM",
    "wino_grande": "ACC",
    "wiqa": "ACC",
    "xsum": "Rouge-L",
    "yahoo_answers_topics": "Classification-F1",
    "yelp_polarity": "Classification-F1",
    "yelp_review_full": "Pearson-Correlation",
}

DEFAULT_METRIC = "ACC"
TASK_METRICS_FILE = "task_metrics.tsv"


@functools.lru_cache(maxsize=64)
def _read_task_metrics(path: Path, mtime_ns: int, size: int) -> dict[str, str]:
    """Parse and validate a task_metrics.tsv; keyed on mtime/size so an edited file is re-read."""
    del mtime_ns, size  # only part of the cache key
    table: dict[str, str] = {}
    lines = path.read_bytes().split(b"\n")
    for lineno, raw in enumerate(lines, start=1):
        try:
            line = raw.decode("utf-8").rstrip("\r")
        except UnicodeDecodeError:
            raise UserInputError(f"{path}:{lineno}: expected UTF-8 text") from None
        if lineno == 1:
            if line.lstrip("\ufeff").split("\t") != ["task", "metric"]:
                raise UserInputError(f"{path}:1: expected the header 'task<TAB>metric', found {line!r}")
            continue
        if not line.strip():
            continue
        fields = [field.strip() for field in line.split("\t")]
        if len(fields) != 2 or not fields[0]:
            raise UserInputError(f"{path}:{lineno}: expected 'task<TAB>metric', found {line!r}")
        task, metric = fields
        if metric not in METRICS:
            raise UserInputError(
                f"{path}:{lineno}: unknown metric {metric!r} for task {task!r}; "
                f"expected one of {', '.join(sorted(METRICS))}"
            )
        if table.get(task, metric) != metric:
            raise UserInputError(f"{path}:{lineno}: task {task!r} listed again with a different metric")
        table[task] = metric
    return table


def metric_for_task(task: str, task_dir: str | Path | None = None) -> str:
    """Metric for a task: ``{task_dir}/task_metrics.tsv`` first, then TASK_METRICS, then ACC."""
    if task_dir is not None:
        path = Path(task_dir) / TASK_METRICS_FILE
        if path.is_file():
            stat = path.stat()
            table = _read_task_metrics(path.resolve(), stat.st_mtime_ns, stat.st_size)
            if task in table:
                return table[task]
    return TASK_METRICS.get(task, DEFAULT_METRIC)


def trivial_baseline(train_outputs: list[str], references: list[list[str]], metric: str) -> float:
    """Best score of the two trivial predictors: the majority training output everywhere, or an empty answer.

    A delta module has learned something only if it clearly beats this.
    """
    from collections import Counter

    majority = Counter(train_outputs).most_common(1)[0][0] if train_outputs else ""
    return max(score(metric, [majority] * len(references), references),
               score(metric, [""] * len(references), references))
