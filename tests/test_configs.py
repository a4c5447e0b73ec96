"""Typed configurations of the entry points: a config, its command line and back give the same config."""

from __future__ import annotations

import tune
from get_similarity import dev_all, score, tune_all
from models.delta import DeltaConfig
from models.pair_settings import DevAllConfig, TuneAllConfig
from models.settings import TuneConfig
from utils.params import config_from, flags_of


def test_tune_config_round_trips_through_tune_py_flags() -> None:
    config = TuneConfig(delta=DeltaConfig("lora", lora_r=4, lora_alpha=8), tasks=["sent_review"],
                        output_dir="out", learning_rate_list=[3e-3, 1e-2], bsz_list=[8], train_iters=40,
                        warmup_steps=0, do_train=True, do_predict=True, overwrite=True, log_file_only=True,
                        train_checkpoint="fused/x", max_new_tokens=5, k=32)
    argv = config.to_argv()
    assert tune.config_from_args(tune.build_parser().parse_args(argv)) == config
    # only what differs from tune.py's defaults is spelled out; warm-up 0 is not the default (None)
    assert "--warmup_steps" in argv and "--seed" not in argv and "--bf16" not in argv


def test_tune_py_defaults_are_the_library_defaults() -> None:
    parsed = tune.config_from_args(tune.build_parser().parse_args([]))
    assert parsed == TuneConfig(delta=DeltaConfig("adapter"))


def test_tuneall_and_devall_configs_round_trip() -> None:
    ta = TuneAllConfig(source_ckpt_path="src", output_dir="out", tasks=["a"], source_tasks=["b", "c"],
                                steps=7, learning_rate=3e-2, warmup_steps=None, k=16, quiet=True)
    assert config_from(TuneAllConfig, tune_all.build_parser().parse_args(ta.to_argv())) == ta
    da = DevAllConfig(source_ckpt_path="src", output="t.tsv", tasks=["a"], source_tasks=["b"],
                              tuneall_ckpt_path="ta", merge=True, overwrite=True, predict_batch_size=100)
    assert config_from(DevAllConfig, dev_all.build_parser().parse_args(da.to_argv())) == da


def test_score_parser_defaults_are_the_config_defaults() -> None:
    parsed = config_from(score.SimilarityConfig, score.build_parser().parse_args(
        ["--delta", "lora", "--metric", "Loss", "--source_ckpt_path", "src"]))
    assert parsed == score.SimilarityConfig(delta="lora", metric=["Loss"], source_ckpt_path="src")


def test_flags_of_spells_each_kind_of_value() -> None:
    assert flags_of({"a": None, "b": True, "c": False, "d": [1, 2], "e": 0.1, "f": "x"}) == [
        "--b", "--d", "1", "2", "--e", "0.1", "--f", "x"]
