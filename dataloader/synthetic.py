"""Deterministic generator of the bundled synthetic few-shot suite and of the pre-training mixture.

Five skills (families) underlie everything: lexicon sentiment, 3-way topic, typed fact lookup,
category entailment and category extraction. A *task* is a skill rendered with one prompt
template and one set of label words. The bundled suite (``SUITE``) and the pre-training mixture
(``PRETRAIN_TASKS``) use the same lexicon and skills but disjoint prompts and label words, so the
suite's tasks are new phrasings of skills the tiny backbone has seen, as T5's pre-training is to
CrossFit.

Randomness comes only from ``random.Random`` seeded with strings (hashed with SHA-512 by Python,
so independent of PYTHONHASHSEED): the same code always writes the same bytes.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from utils.io import write_text_atomic

# --------------------------------------------------------------------------------------------
# Lexicon: real English words, so the tokenizer and the model see ordinary text.
POSITIVE = ("good great wonderful lovely excellent amazing pleasant delightful fantastic superb "
            "brilliant charming enjoyable perfect nice fine cheerful beautiful splendid friendly").split()
NEGATIVE = ("bad awful terrible horrible poor boring dull nasty ugly dreadful "
            "sad annoying weak broken rude messy noisy bitter gloomy lousy").split()
CATEGORIES: dict[str, list[str]] = {
    "animals": "dog cat horse cow sheep fox wolf bear rabbit mouse tiger lion goat duck eagle".split(),
    "food": "bread cheese apple soup rice pasta cake pizza salad butter honey banana carrot potato cookie".split(),
    "sports": ("football tennis golf soccer hockey boxing rugby cricket baseball skiing swimming "
               "cycling running hiking rowing").split(),
    "music": "guitar piano violin drum song melody concert singer band trumpet flute opera choir rhythm album".split(),
    "vehicles": "car bus train truck bicycle plane boat ship taxi tram scooter rocket van tractor subway".split(),
}
COLOURS = "red blue green yellow black white orange purple brown pink grey silver".split()
NAMES = "tom anna mia leo sam eva max lily ben zoe noah emma jack rosa omar nina paul kate ivan lucy".split()
CITIES = "paris london rome berlin madrid tokyo cairo lima oslo vienna dublin prague athens delhi seoul".split()
FILLERS = "movie book meal trip room service house day story show game class hotel visit store park".split()
ADVERBS = "very really quite so rather truly".split()

# Word lists that the extraction skill can be asked for.
EXTRACTABLE: dict[str, list[str]] = {**CATEGORIES, "colours": COLOURS, "names": NAMES, "cities": CITIES}


def _join(words: list[str]) -> str:
    return " ".join(words)


# --------------------------------------------------------------------------------------------
# Skills: each draws one raw instance (a dict of fields) from an rng.
def draw_sentiment(rng: random.Random) -> dict:
    """A short review whose polarity is carried by one or two adjectives from the lexicon."""
    positive = rng.random() < 0.5
    adjectives = POSITIVE if positive else NEGATIVE
    thing, other = rng.sample(FILLERS, 2)
    pattern = rng.randrange(4)
    if pattern == 0:
        text = f"the {thing} was {rng.choice(ADVERBS)} {rng.choice(adjectives)}"
    elif pattern == 1:
        text = f"the {thing} was {rng.choice(adjectives)} and the {other} was {rng.choice(adjectives)}"
    elif pattern == 2:
        name = rng.choice(NAMES)
        text = f"{name} said the {thing} in {rng.choice(CITIES)} was {rng.choice(adjectives)}"
    else:
        text = f"what a {rng.choice(adjectives)} {thing} , {rng.choice(ADVERBS)} {rng.choice(adjectives)}"
    return {"text": text, "label": "positive" if positive else "negative"}


def draw_topic(rng: random.Random, categories: tuple[str, ...]) -> dict:
    """A sentence that mentions two words of one category among neutral words."""
    category = rng.choice(categories)
    first, second = rng.sample(CATEGORIES[category], 2)
    name, colour = rng.choice(NAMES), rng.choice(COLOURS)
    pattern = rng.randrange(3)
    if pattern == 0:
        text = f"{name} talked about the {colour} {first} and the {second}"
    elif pattern == 1:
        text = f"a story about a {first} , a {second} and {name}"
    else:
        text = f"in {rng.choice(CITIES)} we saw the {first} next to the {colour} {second}"
    return {"text": text, "label": category}


LOOKUP_RELATIONS: dict[str, tuple[str, list[str]]] = {
    # relation -> (what a question calls its value, values)
    "likes": ("food", CATEGORIES["food"]),
    "lives": ("city", CITIES),
    "wears": ("colour", COLOURS),
    "owns": ("pet", CATEGORIES["animals"]),
}
ENTAIL_PHRASES = {"animals": "an animal", "food": "some food", "sports": "a sport", "music": "some music",
                  "vehicles": "a vehicle"}


def draw_lookup(rng: random.Random, n_facts: int = 3) -> dict:
    """Facts about people, one relation each; the question asks for the value of one relation."""
    names = rng.sample(NAMES, n_facts)
    relations = rng.sample(list(LOOKUP_RELATIONS), n_facts)
    values = [rng.choice(LOOKUP_RELATIONS[rel][1]) for rel in relations]
    asked = rng.randrange(n_facts)
    return {"facts": list(zip(names, relations, values)), "relation": relations[asked], "value": values[asked]}


def draw_entail(rng: random.Random) -> dict:
    """A premise naming two things of two categories; the hypothesis claims a thing of some category."""
    first, second = rng.sample(list(ENTAIL_PHRASES), 2)
    name, city = rng.choice(NAMES), rng.choice(CITIES)
    premise = f"{name} saw a {rng.choice(CATEGORIES[first])} and a {rng.choice(CATEGORIES[second])} in {city}"
    entailed = rng.random() < 0.5
    claimed = rng.choice([first, second]) if entailed else rng.choice(
        [c for c in ENTAIL_PHRASES if c not in (first, second)])
    return {"premise": premise, "hypothesis": f"{name} saw {ENTAIL_PHRASES[claimed]}",
            "label": "yes" if entailed else "no"}


def draw_extract(rng: random.Random, category: str) -> dict:
    """A word list mixing 1-3 words of `category` with distractors; the answer keeps the former in order."""
    wanted = rng.sample(EXTRACTABLE[category], rng.randint(1, 3))
    others = [c for c in EXTRACTABLE if c != category]
    distractors = [rng.choice(EXTRACTABLE[rng.choice(others)]) for _ in range(rng.randint(3, 5))]
    words = wanted + distractors
    rng.shuffle(words)
    answer = [w for w in words if w in wanted]
    return {"text": _join(words), "answer": _join(answer)}


# --------------------------------------------------------------------------------------------
# Tasks: a skill + a prompt template + label words.
@dataclass(frozen=True)
class TaskSpec:
    """One task: how to draw an instance and render it as (input, output)."""

    name: str
    family: str
    metric: str
    render: Callable[[random.Random], tuple[str, str]]
    labels: tuple[str, ...] = field(default=())  # fixed label set of classification tasks


def sentiment_task(name: str, template: str, negative: str, positive: str, metric: str = "ACC",
                   family: str = "sentiment") -> TaskSpec:
    words = {"negative": negative, "positive": positive}

    def render(rng: random.Random) -> tuple[str, str]:
        ex = draw_sentiment(rng)
        return template.format(text=ex["text"]), words[ex["label"]]

    return TaskSpec(name, family, metric, render, (negative, positive))


def topic_task(name: str, template: str, labels: dict[str, str], metric: str = "Classification-F1",
               family: str = "topic") -> TaskSpec:
    categories = tuple(labels)

    def render(rng: random.Random) -> tuple[str, str]:
        ex = draw_topic(rng, categories)
        return template.format(text=ex["text"]), labels[ex["label"]]

    return TaskSpec(name, family, metric, render, tuple(labels.values()))


def lookup_task(name: str, facts: dict[str, str], question: str, metric: str = "EM", family: str = "lookup",
                separator: str = " . ") -> TaskSpec:
    """`facts` renders each relation from {name} and {value}; `question` asks for a relation's {thing}."""

    def render(rng: random.Random) -> tuple[str, str]:
        ex = draw_lookup(rng)
        text = separator.join(facts[rel].format(name=n, value=v) for n, rel, v in ex["facts"])
        return f"{text} . {question.format(thing=LOOKUP_RELATIONS[ex['relation']][0])}", ex["value"]

    return TaskSpec(name, family, metric, render)


def entail_task(name: str, template: str, no: str, yes: str, metric: str = "ACC",
                family: str = "entail") -> TaskSpec:
    words = {"no": no, "yes": yes}

    def render(rng: random.Random) -> tuple[str, str]:
        ex = draw_entail(rng)
        return template.format(premise=ex["premise"], hypothesis=ex["hypothesis"]), words[ex["label"]]

    return TaskSpec(name, family, metric, render, (no, yes))


def extract_task(name: str, category: str, template: str, metric: str = "Rouge-L",
                 family: str = "extract") -> TaskSpec:
    def render(rng: random.Random) -> tuple[str, str]:
        ex = draw_extract(rng, category)
        return template.format(text=ex["text"]), ex["answer"]

    return TaskSpec(name, family, metric, render)


def copy_task(name: str, template: str) -> TaskSpec:
    """Pre-training only: echo a random word list, so every lexicon word is seen as an output."""
    vocabulary = sorted({w for words in EXTRACTABLE.values() for w in words} | set(POSITIVE) | set(NEGATIVE)
                        | set(FILLERS) | {"yes", "no", "true", "false", "one", "two", "three", "entailment",
                                          "neutral", "happy", "positive", "negative"})

    def render(rng: random.Random) -> tuple[str, str]:
        words = _join(rng.sample(vocabulary, rng.randint(2, 6)))
        return template.format(text=words), words

    return TaskSpec(name, "copy", "EM", render)


STANDARD_FACTS = {"likes": "{name} likes {value}", "lives": "{name} lives in {value}",
                  "wears": "{name} wears {value}", "owns": "{name} owns a {value}"}
STORY_FACTS = {"likes": "{name} ate the {value}", "lives": "{name} came home to {value}",
               "wears": "{name} put on something {value}", "owns": "{name} fed the {value}"}

# The bundled suite: 5 families x 4 tasks. Label words are shared within a family (positive/negative)
# and across families (yes/no in sentiment and entailment, true/false in topic and entailment), so that a
# similarity metric can be fooled by label words rather than skill -- a known trap worth measuring.
SUITE: tuple[TaskSpec, ...] = (
    sentiment_task("sent_review", "review : {text} . is this review positive or negative ?", "negative", "positive"),
    sentiment_task("sent_tweet", "tweet : {text} . mood :", "sad", "happy"),
    sentiment_task("sent_satisfied", "{text} . was the customer satisfied ?", "no", "yes"),
    sentiment_task("sent_stars", "rate the opinion : {text}", "negative", "positive", metric="Classification-F1"),
    topic_task("topic_news", "news : {text} . section :",
               {"animals": "animals", "food": "food", "sports": "sports"}),
    topic_task("topic_numbered", "{text} . which group , one two or three ?",
               {"music": "one", "vehicles": "two", "animals": "three"}),
    topic_task("topic_places", "where would you hear this : {text}",
               {"food": "kitchen", "music": "concert", "vehicles": "road"}),
    topic_task("topic_truefalse", "{text} . is this about sport , true or false ?",
               {"sports": "true", "food": "false", "vehicles": "false"}, metric="ACC"),
    lookup_task("qa_which", STANDARD_FACTS, "question : which {thing} is mentioned ?"),
    lookup_task("qa_short", STANDARD_FACTS, "{thing} ?"),
    lookup_task("qa_records", {rel: "{name} -> {value}" for rel in LOOKUP_RELATIONS}, "give the {thing}",
                separator=" , "),
    lookup_task("qa_story", STORY_FACTS, "in the story , what is the {thing} ?"),
    entail_task("nli_support", "premise : {premise} . hypothesis : {hypothesis} . supported ?", "no", "yes"),
    entail_task("nli_truefalse", "{premise} . question : {hypothesis} . true or false ?", "false", "true"),
    entail_task("nli_entail", "sentence one : {premise} sentence two : {hypothesis}", "neutral", "entailment",
                metric="Classification-F1"),
    entail_task("nli_consistent", "{hypothesis} ? based on : {premise}", "negative", "positive"),
    extract_task("ext_animals", "animals", "list the animals : {text}"),
    extract_task("ext_colours", "colours", "which colours appear in : {text}"),
    extract_task("ext_food", "food", "{text} . foods mentioned :"),
    extract_task("ext_names", "names", "who is mentioned in : {text}"),
)

# Label-word traps: targets (never sources: they are not in FAMILIES) whose skill is one family's and whose label
# words are another's. They tell apart a metric that rewards a source for emitting the target's words from one that
# finds the sources with its skill.
TRAPS: tuple[TaskSpec, ...] = (
    sentiment_task("trap_sent_truefalse", "{text} . the writer liked it , true or false ?", "false", "true"),
    topic_task("trap_topic_yesno", "{text} . is this about food , yes or no ?",
               {"food": "yes", "sports": "no", "music": "no"}, metric="ACC"),
    entail_task("trap_nli_happysad", "{premise} . does it follow that {hypothesis} ? happy or sad :", "sad",
                "happy"),
    topic_task("trap_topic_posneg", "{text} . about animals , positive or negative ?",
               {"animals": "positive", "vehicles": "negative", "food": "negative"}, metric="ACC"),
)

# Pre-training mixture: the same skills with other prompts and label words, plus copying.
PRETRAIN_TASKS: tuple[TaskSpec, ...] = (
    sentiment_task("pt_sent_a", "opinion : {text} polarity ?", "minus", "plus"),
    sentiment_task("pt_sent_b", "{text} . was the writer pleased ?", "unhappy", "pleased"),
    topic_task("pt_topic_a", "category of : {text}", {c: c for c in CATEGORIES}),
    topic_task("pt_topic_b", "{text} . topic ?", {"animals": "nature", "food": "meal", "sports": "game",
                                                  "music": "sound", "vehicles": "travel"}),
    lookup_task("pt_lookup_a", {rel: "{name} : {value}" for rel in LOOKUP_RELATIONS}, "find the {thing}",
                separator=" ; "),
    lookup_task("pt_lookup_b", STANDARD_FACTS, "the {thing} is ?"),
    entail_task("pt_entail_a", "text : {premise} claim : {hypothesis} holds ?", "fails", "holds"),
    entail_task("pt_entail_b", "{premise} || {hypothesis} implied ?", "unrelated", "implied"),
    *[extract_task(f"pt_extract_{c}", c, f"find {c} words : {{text}}") for c in EXTRACTABLE],
    *[extract_task(f"pt_keep_{c}", c, f"{{text}} keep only {c}") for c in EXTRACTABLE],
    copy_task("pt_copy", "repeat : {text}"),
)

# Generating word lists (extraction, copying) is slower to learn than choosing a label: give it more data.
PRETRAIN_SKILL_WEIGHTS = {"extract": 2.0, "copy": 2.0}

SUITE_BY_NAME = {spec.name: spec for spec in SUITE}
TRAP_FAMILIES = {spec.name: spec.family for spec in TRAPS}
FAMILIES: dict[str, list[str]] = {}
for _spec in SUITE:
    FAMILIES.setdefault(_spec.family, []).append(_spec.name)

SUITE_DIR = Path(__file__).resolve().parents[1] / "data" / "synthetic"  # where data/make_suite.py writes it

# Split sizes of the bundled suite.
TEST_SIZE = 200
LARGE_K, LARGE_SEED, LARGE_DEV = 512, 100, 64  # source modules train on {task}_512_100_train.tsv
FEW_SHOT = ((16, 13), (16, 42), (16, 100), (64, 100))  # (k, seed) of the few-shot files


def unique_examples(spec: TaskSpec, rng: random.Random, n: int, seen: set[str]) -> list[tuple[str, str]]:
    """Draw `n` examples whose inputs are not in `seen` (and add them to it)."""
    out: list[tuple[str, str]] = []
    attempts = 0
    while len(out) < n:
        attempts += 1
        if attempts > 200 * n:
            raise RuntimeError(f"{spec.name}: cannot draw {n} distinct examples")
        text, answer = spec.render(rng)
        if text not in seen:
            seen.add(text)
            out.append((text, answer))
    return out


def build_task_splits(spec: TaskSpec) -> dict[tuple[int, int], dict[str, list[tuple[str, str]]]]:
    """All files of one task: {(k, seed): {split: examples}}. Test inputs never occur in train or dev."""
    seen: set[str] = set()
    test = unique_examples(spec, random.Random(f"{spec.name}/test"), TEST_SIZE, seen)
    files = {(LARGE_K, LARGE_SEED): {
        "train": unique_examples(spec, random.Random(f"{spec.name}/large-train"), LARGE_K, seen),
        "dev": unique_examples(spec, random.Random(f"{spec.name}/large-dev"), LARGE_DEV, seen),
        "test": test,
    }}
    for k, seed in FEW_SHOT:
        rng = random.Random(f"{spec.name}/{k}/{seed}")
        few_seen = set(seen)  # few-shot splits may overlap the large split, never the test split
        files[(k, seed)] = {"train": unique_examples(spec, rng, k, few_seen),
                            "dev": unique_examples(spec, rng, k, few_seen), "test": test}
    return files


def write_suite(out_dir: Path, specs: tuple[TaskSpec, ...] = SUITE + TRAPS) -> list[Path]:
    """Write the suite in CrossFit layout plus `task_metrics.tsv`; returns the written files."""
    written = []
    for spec in specs:
        task_dir = out_dir / spec.name
        task_dir.mkdir(parents=True, exist_ok=True)
        for (k, seed), splits in build_task_splits(spec).items():
            for split, examples in splits.items():
                path = task_dir / f"{spec.name}_{k}_{seed}_{split}.tsv"
                write_text_atomic(path, "".join(f"{x}\t{y}\n" for x, y in examples))
                written.append(path)
    metrics = out_dir / "task_metrics.tsv"
    write_text_atomic(metrics, "task\tmetric\n" + "".join(f"{s.name}\t{s.metric}\n" for s in specs))
    written.append(metrics)
    return written


def pretraining_stream(seed: int):
    """Endless deterministic stream of (input, output) pairs from the pre-training mixture.

    Skills are drawn uniformly, then a task within the skill: drawing tasks uniformly would starve the
    skills with few phrasings (entailment, copy) in favour of those with many (extraction).
    """
    rng = random.Random(f"pretrain/{seed}")
    by_skill: dict[str, list[TaskSpec]] = {}
    for spec in PRETRAIN_TASKS:
        by_skill.setdefault(spec.family, []).append(spec)
    skills = list(by_skill)
    weights = [PRETRAIN_SKILL_WEIGHTS.get(skill, 1.0) for skill in skills]
    while True:
        skill = rng.choices(skills, weights)[0]
        yield rng.choice(by_skill[skill]).render(rng)
