"""One table of delta-module sizes: the paper's (T5-base) and the embedded default's (a 2.6M-parameter T5).

``tune.py``'s flags (and ``DeltaConfig``) default to the paper's sizes; the bash sweeps (``scripts/adapter.sh``,
``lora.sh``, ``prefix.sh``) and ``study.py`` default to the embedded default's. All of them read this table, so
their defaults cannot drift apart. Plain Python with no imports beyond the standard library, so a bash script
can ask it without loading torch::

    python models/sizes.py --shell default lora     # : "${LORA_R:=8}"; : "${LORA_ALPHA:=16}"
"""

from __future__ import annotations

import argparse
import sys

METHOD_SIZES: dict[str, dict[str, dict[str, int | str]]] = {
    # The paper's setting (README, "The paper's setting on a GPU box").
    "paper": {
        "adapter": {"adapter_type": "houlsby", "adapter_size": 12},
        "lora": {"lora_r": 10, "lora_alpha": 16, "lora_targets": "q,v"},
        "prefix": {"prefix_length": 120, "prefix_mlp": 24},
        "ia3": {},  # (IA)³ has no sizes: one vector per rescaled activation
    },
    # The embedded default (d_model 128): a shorter prefix with a wider MLP, LoRA of rank 8.
    "default": {
        "adapter": {"adapter_type": "houlsby", "adapter_size": 12},
        "lora": {"lora_r": 8, "lora_alpha": 16, "lora_targets": "q,v"},
        "prefix": {"prefix_length": 32, "prefix_mlp": 64},
        "ia3": {},
    },
}
PROFILES = tuple(METHOD_SIZES)


def sizes(profile: str, method: str) -> dict[str, int | str]:
    """The size fields of ``method`` under ``profile`` (a copy)."""
    return dict(METHOD_SIZES[profile][method])


def shell_defaults(profile: str, method: str) -> str:
    """Bash that sets each size's variable (LORA_R, ...) unless the environment already does."""
    return "; ".join(f': "${{{name.upper()}:={value}}}"' for name, value in METHOD_SIZES[profile][method].items())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--shell", action="store_true", help="print bash defaults (: \"${LORA_R:=8}\"; ...) to eval")
    p.add_argument("profile", choices=PROFILES)
    p.add_argument("method", choices=sorted(METHOD_SIZES["paper"]))
    args = p.parse_args(argv)
    if args.shell:
        print(shell_defaults(args.profile, args.method))
    else:
        for name, value in METHOD_SIZES[args.profile][args.method].items():
            print(f"{name}\t{value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
