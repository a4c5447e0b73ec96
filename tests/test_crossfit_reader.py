"""The CrossFit reader: round trips, tolerated quirks, and one precise error per kind of bad input."""

import random
from pathlib import Path

import pytest

from dataloader.crossfit import (
    SPLITS,
    Example,
    available_shots,
    list_tasks,
    load_task,
    pick_output,
    read_split,
    split_path,
)
from utils.errors import UserInputError


def write_split(
    task_dir: Path, task: str, split: str, data: bytes | str, k: int = 16, seed: int = 100
) -> Path:
    path = split_path(task_dir, task, k, seed, split)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data.encode("utf-8") if isinstance(data, str) else data)
    return path


def write_task(task_dir: Path, task: str, k: int = 16, seed: int = 100) -> None:
    for split in SPLITS:
        write_split(task_dir, task, split, f"{split} question one\t{split} answer\n", k=k, seed=seed)


def test_split_path_layout(tmp_path: Path) -> None:
    assert (
        split_path(tmp_path, "glue-mrpc", 16, 100, "dev")
        == tmp_path / "glue-mrpc" / "glue-mrpc_16_100_dev.tsv"
    )
    with pytest.raises(UserInputError, match="unknown split 'valid'"):
        split_path(tmp_path, "glue-mrpc", 16, 100, "valid")


def test_round_trip(tmp_path: Path) -> None:
    examples = [Example("is the sky blue ?", ("yes",)), Example("2 + 2 =", ("4", "four"))]
    text = "".join("\t".join((ex.input, *ex.outputs)) + "\n" for ex in examples)
    path = write_split(tmp_path, "toy", "train", text)
    assert read_split(path) == examples


def test_multi_answer_and_empty_extra_fields(tmp_path: Path) -> None:
    path = write_split(tmp_path, "toy", "train", "who ?\tann\tanna\t\nwhat ?\t\tx\n")
    assert read_split(path) == [Example("who ?", ("ann", "anna")), Example("what ?", ("x",))]


def test_crlf_and_trailing_blank_line(tmp_path: Path) -> None:
    path = write_split(tmp_path, "toy", "train", "a b\tc\r\nd e\tf\tg\r\n\r\n")
    assert read_split(path) == [Example("a b", ("c",)), Example("d e", ("f", "g"))]


def test_no_final_newline_and_bom(tmp_path: Path) -> None:
    path = write_split(tmp_path, "toy", "train", "\ufeffhello\tworld")
    assert read_split(path) == [Example("hello", ("world",))]


def test_fields_are_stripped(tmp_path: Path) -> None:
    path = write_split(tmp_path, "toy", "train", "  padded input \t answer  \n")
    assert read_split(path) == [Example("padded input", ("answer",))]


@pytest.mark.parametrize(
    ("data", "lineno", "fragment"),
    [
        ("ok\tfine\nno tab here\n", 2, "found no tab"),
        ("ok\tfine\n\nok\tfine\n", 2, "found an empty line"),
        ("ok\tfine\n   \tanswer\n", 2, "non-empty input"),
        ("ok\tfine\nok\tfine\nquestion\t \t\n", 3, "non-empty output"),
        (b"ok\tfine\nbad \xff byte\tx\n", 2, "UTF-8"),
        ("ok\tfine\n" + "x" * 1_000_001 + "\ty\n", 2, "1,000,000"),
    ],
    ids=["no-tab", "blank-line", "empty-input", "empty-output", "non-utf8", "long-line"],
)
def test_bad_line_names_file_and_line(tmp_path: Path, data: str | bytes, lineno: int, fragment: str) -> None:
    path = write_split(tmp_path, "toy", "train", data)
    with pytest.raises(UserInputError) as err:
        read_split(path)
    message = str(err.value)
    assert message.startswith(f"{path}:{lineno}: "), message
    assert fragment in message
    assert "\n" not in message


def test_long_line_limit_is_inclusive(tmp_path: Path) -> None:
    line = "x" * (1_000_000 - 2) + "\ty"
    path = write_split(tmp_path, "toy", "train", line + "\n")
    assert read_split(path)[0].outputs == ("y",)


@pytest.mark.parametrize("data", ["", "\n", "\r\n\n"], ids=["zero-bytes", "newline", "blank-lines"])
def test_empty_split(tmp_path: Path, data: str) -> None:
    path = write_split(tmp_path, "toy", "train", data)
    with pytest.raises(UserInputError, match="empty split") as err:
        read_split(path)
    assert str(path) in str(err.value)


def test_missing_split_lists_what_exists(tmp_path: Path) -> None:
    write_task(tmp_path, "toy", k=16, seed=100)
    write_split(tmp_path, "toy", "train", "a\tb\n", k=32, seed=13)
    with pytest.raises(UserInputError) as err:
        load_task(tmp_path, "toy", 32, 13)
    message = str(err.value)
    assert "toy_32_13_dev.tsv" in message
    assert "k=16 seed=100 (train, dev, test)" in message
    assert "k=32 seed=13 (train)" in message


def test_missing_file_in_missing_folder(tmp_path: Path) -> None:
    with pytest.raises(UserInputError, match="does not exist"):
        read_split(tmp_path / "nowhere" / "nowhere_16_100_train.tsv")


def test_missing_task_dir(tmp_path: Path) -> None:
    with pytest.raises(UserInputError, match=r"task_dir .*absent does not exist"):
        load_task(tmp_path / "absent", "toy", 16, 100)
    with pytest.raises(UserInputError, match="does not exist"):
        list_tasks(tmp_path / "absent")


def test_missing_task_suggests_close_names(tmp_path: Path) -> None:
    write_task(tmp_path, "glue-mrpc")
    with pytest.raises(UserInputError, match=r"task 'glue_mrpc' not found.*did you mean glue-mrpc\?"):
        load_task(tmp_path, "glue_mrpc", 16, 100)
    with pytest.raises(UserInputError, match="task 'zzz' not found"):
        available_shots(tmp_path, "zzz")


def test_load_task_and_listing(tmp_path: Path) -> None:
    write_task(tmp_path, "beta")
    write_task(tmp_path, "alpha", k=16, seed=13)
    write_task(tmp_path, "alpha", k=32, seed=100)
    (tmp_path / "no_tsv_here").mkdir()
    (tmp_path / "task_metrics.tsv").write_text("task\tmetric\n")
    write_split(tmp_path, "alpha", "train", "a\tb\n", k=16, seed=999)
    (tmp_path / "alpha" / "alpha_notes.tsv").write_text("ignored\tfile\n")

    assert list_tasks(tmp_path) == ["alpha", "beta"]
    assert available_shots(tmp_path, "alpha") == [(16, 13), (16, 999), (32, 100)]
    data = load_task(tmp_path, "alpha", 32, 100)
    assert list(data) == list(SPLITS)
    assert data["dev"] == [Example("dev question one", ("dev answer",))]
    assert list(load_task(tmp_path, "alpha", 16, 999, splits=("train",))) == ["train"]


def test_pick_output_draws_every_answer() -> None:
    example = Example("q", ("a", "b", "c"))
    rng = random.Random(0)
    drawn = {pick_output(example, rng) for _ in range(200)}
    assert drawn == {"a", "b", "c"}
    assert pick_output(Example("q", ("only",)), rng) == "only"
    first = [pick_output(example, random.Random(7)) for _ in range(3)]
    assert len(set(first)) == 1  # same seed, same draw


def test_example_needs_an_output() -> None:
    with pytest.raises(ValueError):
        Example("q", ())
