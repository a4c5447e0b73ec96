"""Write the bundled synthetic few-shot suite (CrossFit layout) into data/synthetic/.

Deterministic: the same code writes the same bytes, so the committed files can be checked against a
fresh run (tests/test_synthetic_suite.py does). Families, tasks and split sizes live in
dataloader/synthetic.py.

    .venv/bin/python data/make_suite.py [--out data/synthetic]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from dataloader.synthetic import write_suite  # noqa: E402
from utils.io import staged_dir  # noqa: E402
from utils.params import HelpFormatter  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "synthetic"),
                        help="the suite's folder (written whole)")
    args = parser.parse_args(argv)
    out = Path(args.out)
    with staged_dir(out) as tmp:  # the old suite stays in place until the new one is complete
        files = write_suite(tmp)
    print(f"wrote {len(files)} files under {out}")


if __name__ == "__main__":
    main()
