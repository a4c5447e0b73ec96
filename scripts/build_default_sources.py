"""Build the embedded default's LoRA source library, models/default-sources/lora/, which `make demo` reads.

One module per bundled task, trained as study.py's source stage trains it (its source_* knobs and the embedded
default's LoRA sizes), one module at a time, on the CPU: deterministic, so any module can be rebuilt alone and
compared with the committed one (tests/test_source_library.py). About 4 minutes on 2 CPU cores.

    .venv/bin/python scripts/build_default_sources.py            # rewrites models/default-sources/lora
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from models.sizes import METHOD_SIZES  # noqa: E402
from utils.errors import run_cli  # noqa: E402
from utils.params import REPO_ROOT, block_params, parse_params  # noqa: E402

# ---- parameters (each one can be overridden on the command line as --name value) -------------------
output = "models/default-sources/lora"
model = "models/default"
task_dir = "data/synthetic"
tasks = "ALL_TASKS"
overwrite = False  # True: replace an existing library
# -----------------------------------------------------------------------------------------------------
PARAMS = block_params(globals())
HELP = {"output": "the library folder (written whole, once every module is trained)",
        "model": "backbone folder", "task_dir": "CrossFit-layout data: each task's large split (k=512)",
        "tasks": "task names or task_list.py lists: one module each", "overwrite": "replace an existing --output"}


def main(argv: list[str] | None = None) -> int:
    p = parse_params(PARAMS, argv, __doc__, HELP, list_params=("tasks",))  # before torch loads: --help at once
    from models.source_library import LibrarySettings, build_library
    from task_list import resolve_tasks
    from utils.errors import UserInputError
    from utils.io import check_output_folder

    out = check_output_folder(p.output, "--output", {"--model": p.model, "--task_dir": p.task_dir})
    if out.exists() and not p.overwrite:
        raise UserInputError(f"--output {out}: exists; pass --overwrite true to rebuild it")

    def portable(path: str) -> str:  # the manifest names the repository's own folders relative to it
        resolved = Path(path).resolve()
        return str(resolved.relative_to(REPO_ROOT)) if resolved.is_relative_to(REPO_ROOT) else path

    settings = LibrarySettings(model=portable(p.model), task_dir=portable(p.task_dir),
                               tasks=resolve_tasks(p.tasks.split()),
                               sizes=dict(METHOD_SIZES["default"]["lora"]))
    build_library(settings, out)
    print(f"{len(settings.tasks)} modules -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
