"""Write the bundled synthetic few-shot suite (CrossFit layout) into data/synthetic/.

Deterministic: the same code writes the same bytes, so the committed files can be checked against a
fresh run (tests/test_synthetic_suite.py does). Families, tasks and split sizes live in
dataloader/synthetic.py.

    .venv/bin/python data/make_suite.py [--out data/synthetic]
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from dataloader.synthetic import write_suite  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "synthetic"))
    args = parser.parse_args()
    out = Path(args.out)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    files = write_suite(tmp)
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    print(f"wrote {len(files)} files under {out}")


if __name__ == "__main__":
    main()
