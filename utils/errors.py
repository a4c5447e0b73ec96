"""The exception types entry points report in one line: bad user input (files, flags, checkpoints), exit
code 2, so a user sees `path:line: what was expected` instead of a traceback; and training that failed for
some modules while the others were written, exit code 1.
"""


class UserInputError(Exception):
    """Bad input that the user can fix: a file, a line, a flag or a checkpoint."""


class TrainingFailed(Exception):
    """Some modules could not be trained (their loss stopped being finite); the others were written.

    Entry points print its message as one line and exit with code 1: a rerun retries only what is missing.
    """


BUG_EXIT = 3  # an unexpected exception: a bug of this project, reported as one


def environment_failure(e: OSError) -> str:
    """One line for a failure of the machine rather than of the input (disk full, permission denied, a
    read-only file system): what happened and the path it happened to."""
    import errno

    what = e.strerror or type(e).__name__
    paths = [str(p) for p in (e.filename, e.filename2) if p is not None]
    hint = {errno.ENOSPC: "free some space and rerun: finished work is kept",
            errno.EDQUOT: "free some space and rerun: finished work is kept",
            errno.EACCES: "check the folder's permissions", errno.EPERM: "check the folder's permissions",
            errno.EROFS: "write somewhere else"}.get(e.errno or 0, "")
    where = f"{' -> '.join(paths)}: " if paths else ""
    return f"{where}{what}" + (f"; {hint}" if hint else "")


def explain(e: Exception) -> tuple[str, int]:
    """The one line and the exit code an entry point gives for ``e``."""
    if isinstance(e, UserInputError):
        return str(e), 2
    if isinstance(e, TrainingFailed):
        return str(e), 1
    if isinstance(e, OSError):
        return environment_failure(e), 1
    if isinstance(e, RecursionError):
        return "an input nested too deeply to read (a JSON or TSV file?); rerun with --debug to see where", 2
    return (f"internal error, a bug in this project ({type(e).__name__}: {first_line(e, 160)}); please report it "
            "with the output of the same command plus --debug", BUG_EXIT)


def first_line(e: BaseException, limit: int = 200) -> str:
    """The gist of a library error for a one-line message: its first non-blank line, at most ``limit`` characters."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    line = lines[0] if lines else type(e).__name__
    return line if len(line) <= limit else line[: limit - 3] + "..."


def run_cli(main, argv: list[str] | None = None) -> int:
    """Run ``main(argv)``; a UserInputError becomes one line on stderr and exit code 2.

    ``--debug`` anywhere on the command line lets the traceback through instead. Command-line parsing
    errors (an unknown flag, ``--train_iters abc``) become the same single line instead of argparse's usage
    block. A failure of the machine (``OSError``: disk full, permission denied) is one line naming the path,
    exit 1; any other exception is a bug of this project, and says so in one line (exit 3) with how to get
    the traceback for a report.
    """
    import argparse
    import sys

    argv = sys.argv[1:] if argv is None else list(argv)
    debug = "--debug" in argv

    def parse_error(parser: argparse.ArgumentParser, message: str) -> None:
        # argparse would print the whole usage block and exit; one line naming the flag is enough.
        raise UserInputError(f"{message} (see {parser.prog} --help)")

    original = argparse.ArgumentParser.error
    argparse.ArgumentParser.error = parse_error  # type: ignore[method-assign]
    try:
        return int(main([a for a in argv if a != "--debug"]) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - the last line of defence: no traceback reaches the user unasked
        if debug:
            raise
        message, code = explain(e)
        print(f"error: {message}", file=sys.stderr)
        return code
    finally:
        argparse.ArgumentParser.error = original  # type: ignore[method-assign]


def answer_flags_early(build_parser) -> None:
    """Parse the command line once before a script's heavy imports: ``--help`` prints and exits 0, a refused flag
    prints one line and exits 2, without waiting for torch to load. The script parses again in its ``main``."""
    import sys

    code = run_cli(lambda argv: build_parser().parse_args(argv) and 0)
    if code:
        sys.exit(code)
