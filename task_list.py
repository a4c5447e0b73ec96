"""Named task lists. Every script that takes ``--tasks`` (or ``TASKS=``) accepts these names or task names.

The bundled synthetic suite comes with one list per family; its families are also its manual
categories (what the "manual division" fusion method averages within). They are written out here, as
plain lists a user edits, and tests/test_synthetic_suite.py checks them against the generator's own
families (dataloader/synthetic.py). Real CrossFit lists are given for the paper's setting on a GPU box.
"""

from __future__ import annotations

from pathlib import Path

from utils.errors import UserInputError

# --- the bundled synthetic suite (data/synthetic), one list per family --------------------------------
SENTIMENT_TASKS = ["sent_review", "sent_tweet", "sent_satisfied", "sent_stars"]
TOPIC_TASKS = ["topic_news", "topic_numbered", "topic_places", "topic_truefalse"]
LOOKUP_TASKS = ["qa_which", "qa_short", "qa_records", "qa_story"]
ENTAIL_TASKS = ["nli_support", "nli_truefalse", "nli_entail", "nli_consistent"]
EXTRACT_TASKS = ["ext_animals", "ext_colours", "ext_food", "ext_names"]
FAMILIES: dict[str, list[str]] = {"sentiment": SENTIMENT_TASKS, "topic": TOPIC_TASKS, "lookup": LOOKUP_TASKS,
                                  "entail": ENTAIL_TASKS, "extract": EXTRACT_TASKS}
ALL_TASKS = [task for tasks in FAMILIES.values() for task in tasks]
# Label-word traps (targets only): each has one family's skill and another family's label words.
TRAP_TASKS = ["trap_sent_truefalse", "trap_topic_yesno", "trap_nli_happysad", "trap_topic_posneg"]
TRAP_CATEGORIES = {"trap_sent_truefalse": "sentiment", "trap_topic_yesno": "topic", "trap_nli_happysad": "entail",
                   "trap_topic_posneg": "topic"}
# One task per family: the small default of the tuning scripts.
SAMPLE_TASKS = [tasks[0] for tasks in FAMILIES.values()]

# --- the paper's setting: 32 CrossFit QA tasks in five manual categories (from the original code) -----------
PAPER_CATEGORIES: dict[str, list[str]] = {
    "machine_reading_comprehension": ["adversarialqa", "hotpot_qa", "superglue-record"],
    "multiple_choice_qa": [
        "ai2_arc", "codah", "commonsense_qa", "cosmos_qa", "dream", "hellaswag", "openbookqa", "qasc", "quail",
        "quarel", "quartz-no_knowledge", "quartz-with_knowledge", "race-high", "race-middle", "sciq",
        "superglue-copa", "swag", "wino_grande", "wiqa",
    ],
    "binary": ["boolq", "mc_taco"],
    "long_form_qa": ["eli5-askh", "eli5-asks", "eli5-eli5"],
    "closed_book_qa": ["lama-conceptnet", "lama-google_re", "numer_sense", "search_qa", "web_questions"],
}
PAPER_QA_TASKS = [task for tasks in PAPER_CATEGORIES.values() for task in tasks]

# Not the paper's list: the 32 QA tasks present in a common 98-task CrossFit few-shot release (closed-book,
# multiple-choice and reading comprehension), for a QA study on that release. They have no manual categories
# unless a task_categories.tsv gives them.
CROSSFIT_QA_TASKS = [
    "ai2_arc", "boolq", "codah", "commonsense_qa", "cosmos_qa", "dream", "freebase_qa", "kilt_hotpotqa",
    "kilt_nq", "kilt_trex", "kilt_zsre", "lama-conceptnet", "lama-google_re", "lama-squad", "lama-trex",
    "mc_taco", "numer_sense", "openbookqa", "piqa", "qasc", "quarel", "quartz-no_knowledge",
    "quartz-with_knowledge", "race-middle", "ropes", "sciq", "social_i_qa", "squad-no_context",
    "superglue-multirc", "tweet_qa", "web_questions", "wino_grande",
]

TASK_LISTS: dict[str, list[str]] = {
    "ALL_TASKS": ALL_TASKS,
    "TRAP_TASKS": TRAP_TASKS,
    "SAMPLE_TASKS": SAMPLE_TASKS,
    "SENTIMENT_TASKS": SENTIMENT_TASKS,
    "TOPIC_TASKS": TOPIC_TASKS,
    "LOOKUP_TASKS": LOOKUP_TASKS,
    "ENTAIL_TASKS": ENTAIL_TASKS,
    "EXTRACT_TASKS": EXTRACT_TASKS,
    "PAPER_QA_TASKS": PAPER_QA_TASKS,
    "CROSSFIT_QA_TASKS": CROSSFIT_QA_TASKS,
}

# Manual categories: task -> category, used by the "manual division" fusion method and family precision.
MANUAL_CATEGORIES: dict[str, str] = {**{task: category for groups in (FAMILIES, PAPER_CATEGORIES)
                                        for category, tasks in groups.items() for task in tasks}, **TRAP_CATEGORIES}
CATEGORIES_FILE = "task_categories.tsv"  # optional, in a task folder: columns task, category


def task_categories(task_dir: str | Path | None = None) -> dict[str, str]:
    """MANUAL_CATEGORIES, updated by ``{task_dir}/task_categories.tsv`` when the folder has one."""
    from utils.io import read_tsv

    categories = dict(MANUAL_CATEGORIES)
    path = Path(task_dir) / CATEGORIES_FILE if task_dir else None
    if path is not None and path.is_file():
        seen: dict[str, int] = {}
        for line, row in read_tsv(path, ["task", "category"], exact=True):
            if not row["task"] or not row["category"]:
                raise UserInputError(f"{path}:{line}: expected a task name and a category, found an empty field")
            if row["task"] in seen:
                raise UserInputError(f"{path}:{line}: task {row['task']!r} is listed again (first on line "
                                     f"{seen[row['task']]})")
            seen[row["task"]] = line
            categories[row["task"]] = row["category"]
    return categories


def resolve_tasks(names: list[str] | str, known_tasks: list[str] | None = None, flag: str = "--tasks") -> list[str]:
    """Expand named lists and explicit task names (space- or comma-separated) into a list of tasks.

    A name that is neither a list nor (when ``known_tasks`` is given) a known task is refused, and so
    is a task named twice: both are almost always a typo in a sweep script. Messages name ``flag``.
    """
    if isinstance(names, str):
        names = [names]
    tokens = [t for name in names for t in name.replace(",", " ").split()]
    if not tokens:
        raise UserInputError(f"{flag}: no task given")
    tasks: list[str] = []
    for token in tokens:
        if token in TASK_LISTS:
            tasks.extend(TASK_LISTS[token])
        elif token.isupper() or (known_tasks is not None and token not in known_tasks):
            lists = ", ".join(TASK_LISTS)
            raise UserInputError(f"{flag}: unknown task or task list {token!r}; lists are: {lists}")
        else:
            tasks.append(token)
    duplicates = sorted({t for t in tasks if tasks.count(t) > 1})
    if duplicates:
        raise UserInputError(f"{flag}: task named more than once: {', '.join(duplicates)}")
    return tasks


def resolve_tasks_in(task_dir: str | Path, names: list[str] | str) -> tuple[Path, list[str]]:
    """``task_dir`` (which must exist) and the tasks ``names`` stand for, each a task folder of it."""
    from dataloader.crossfit import list_tasks

    task_dir = Path(task_dir)
    if not task_dir.is_dir():
        raise UserInputError(f"--task_dir {task_dir}: folder does not exist")
    return task_dir, resolve_tasks(names, known_tasks=list_tasks(task_dir))
