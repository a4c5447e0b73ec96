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
# One task per family: the small default of the tuning scripts.
SAMPLE_TASKS = [tasks[0] for tasks in FAMILIES.values()]

# --- real CrossFit tasks (the paper's setting: QA tasks, leave-one-out) ---------------------------------
CROSSFIT_QA_TASKS = [
    # 32 CrossFit QA tasks: closed-book, multiple-choice and reading comprehension.
    "ai2_arc", "boolq", "codah", "commonsense_qa", "cosmos_qa", "dream", "freebase_qa", "kilt_hotpotqa",
    "kilt_nq", "kilt_trex", "kilt_zsre", "lama-conceptnet", "lama-google_re", "lama-squad", "lama-trex",
    "mc_taco", "numer_sense", "openbookqa", "piqa", "qasc", "quarel", "quartz-no_knowledge",
    "quartz-with_knowledge", "race-middle", "ropes", "sciq", "social_i_qa", "squad-no_context",
    "superglue-multirc", "tweet_qa", "web_questions", "wino_grande",
]

TASK_LISTS: dict[str, list[str]] = {
    "ALL_TASKS": ALL_TASKS,
    "SAMPLE_TASKS": SAMPLE_TASKS,
    "SENTIMENT_TASKS": SENTIMENT_TASKS,
    "TOPIC_TASKS": TOPIC_TASKS,
    "LOOKUP_TASKS": LOOKUP_TASKS,
    "ENTAIL_TASKS": ENTAIL_TASKS,
    "EXTRACT_TASKS": EXTRACT_TASKS,
    "CROSSFIT_QA_TASKS": CROSSFIT_QA_TASKS,
}

# Manual categories: task -> category, used by the "manual division" fusion method.
MANUAL_CATEGORIES: dict[str, str] = {task: family for family, tasks in FAMILIES.items() for task in tasks}


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
