"""The `ipab` command line: one parser; each part of the system registers its own commands.

This module is neutral ground: the control plane (`scheduler`) always registers its
commands; the worker's (`ipab worker`, `generate`, `models`) are registered only when the
worker extra (torch, diffusers, transformers) is installed. Without it they stop with one
line saying what to install. Command modules must not import torch at import time.
"""

from __future__ import annotations

import argparse
import functools
import gc
import importlib
import importlib.util
import os
import sys
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any, Final

from shared.errors import IpabError
from shared.logs import configure_logging
from shared.redact import mask_text, mask_url

# Start-up: building the parser and printing help load only light modules (the docstring above
# is `ipab --help`'s description, so this is said here). Command modules import at their top
# only what their parsers need (the standard library, light `shared` modules: statuses, lanes,
# errors); each command imports what it runs when it runs (SQLAlchemy, Redis, boto3, pydantic
# settings, rich, PIL, torch), and `service_of` recognises a service's errors without importing
# its library. Held by tests/scheduler/cli/test_startup_imports.py; timed by bench/startup.py.

# The cyclic garbage collector is paused while a command starts: its imports make some 75k objects
# that live as long as the process (SQLAlchemy's and pydantic's classes, the models, the settings'
# schema), and the collector walked them over and over while they were made, and once more at exit:
# a quarter of the CPU of `ipab status`. Reference counting still frees everything else. The pause
# ends when the command returns or after STARTUP_GC_PAUSE_S, whichever comes first, so a
# long-running command (a worker, the API, a loop) collects as usual after its start; a child
# forked during the pause collects. When `main` is the program (no `argv` given), what exists when
# the pause ends is frozen (`gc.freeze`): never walked again, by the collection at exit neither.
STARTUP_GC_PAUSE_S: Final = 1.0

# Each module defines `register(subparsers)`, adding parsers whose `func` takes the args.
CONTROL_PLANE_MODULES: Final = (
    "scheduler.cli.batches",
    "scheduler.cli.grid",
    "scheduler.cli.export",
    "scheduler.cli.gallery",
    "scheduler.cli.ops",
    "scheduler.cli.cache",
    "scheduler.cli.keys",
    "scheduler.cli.serve_api",
    "scheduler.cli.plans",
    "scheduler.cli.usage",
    "scheduler.cli.retention",
)
WORKER_MODULES: Final = ("worker.commands", "worker.serve")
WORKER_COMMANDS: Final = ("worker", "generate", "models", "reproduce")
WORKER_EXTRA_MODULES: Final = ("torch", "diffusers", "transformers")
# The failures of a service that no command translated: (module, its error classes, the setting, the service).
# Looked up in `sys.modules`, never imported: nothing heavy loads before a command needs it, and a
# library that was never loaded raised nothing.
SERVICE_ERRORS: Final = (
    ("sqlalchemy.exc", ("SQLAlchemyError",), "database_url", "the database"),
    ("redis.exceptions", ("RedisError",), "redis_url", "Redis"),
    ("botocore.exceptions", ("BotoCoreError", "ClientError"), "s3_endpoint_url", "the object store"),
)
WORKER_EXTRA_HINT: Final = "install the worker extra: pip install 'ipab[worker]' (torch, diffusers, transformers)"


def worker_extra_missing() -> str | None:
    """The first module of the worker extra that cannot be imported, or None when all can."""
    for name in WORKER_EXTRA_MODULES:
        try:
            if importlib.util.find_spec(name) is None:
                return name
        except (ImportError, ValueError):
            return name
    return None


def _register_missing_worker(subparsers: Any, missing: str) -> None:
    def refuse(args: argparse.Namespace) -> int:
        print(
            f"ipab: error: `ipab {args.command}` needs {missing}, which is not installed; {WORKER_EXTRA_HINT}",
            file=sys.stderr,
        )
        return 2

    for name in WORKER_COMMANDS:
        p = subparsers.add_parser(name, help=f"(needs the worker extra: {missing} is missing)")
        p.set_defaults(func=refuse, takes_any_arguments=True)


def build_parser() -> argparse.ArgumentParser:
    """The full `ipab` parser with every available command registered."""
    parser = argparse.ArgumentParser(prog="ipab", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="log at debug level")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in CONTROL_PLANE_MODULES:
        importlib.import_module(name).register(sub)
    missing = worker_extra_missing()
    if missing is None:
        for name in WORKER_MODULES:
            importlib.import_module(name).register(sub)
    else:
        _register_missing_worker(sub, missing)
    return parser


_gc_pause_on = False  # True while `_gc_paused` holds the collector off (a flag: no lock to hold at a fork)


def _collect_in_child() -> None:
    global _gc_pause_on
    if _gc_pause_on:  # forked during the pause: the timer that ends it stayed in the parent
        _gc_pause_on = False
        gc.enable()


os.register_at_fork(after_in_child=_collect_in_child)


def _end_gc_pause(*, freeze: bool) -> None:
    global _gc_pause_on
    if not _gc_pause_on:  # ended already: by the timer, or by the block's end
        return
    _gc_pause_on = False
    if freeze:
        gc.freeze()
    gc.enable()


@contextmanager
def _gc_paused(seconds: float, *, freeze: bool) -> Iterator[None]:
    """The cyclic garbage collector off in this block, for `seconds` at most (see STARTUP_GC_PAUSE_S);
    with `freeze`, the objects that exist when the pause ends are frozen."""
    if not gc.isenabled():  # someone else turned it off: theirs to turn on
        yield
        return
    global _gc_pause_on
    end = functools.partial(_end_gc_pause, freeze=freeze)
    gc.disable()
    _gc_pause_on = True
    timer = threading.Timer(seconds, end)
    timer.daemon = True
    timer.start()
    try:
        yield
    finally:
        timer.cancel()
        end()


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `ipab` console script; returns the exit status.

    Without `argv` (the console script, `python -m ipab.cli`), it is the program: the process ends
    with it. In-process callers pass `argv`.
    """
    with _gc_paused(STARTUP_GC_PAUSE_S, freeze=argv is None):
        return _run(argv)


def _run(argv: Sequence[str] | None) -> int:
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown and not getattr(args, "takes_any_arguments", False):
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    configure_logging(verbose=args.verbose, log_format=_log_format())
    try:
        code: int = args.func(args)
    except IpabError as e:
        print(f"ipab: error: {mask_text(str(e))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except Exception as e:  # the last guard: a service failure is one line, never a traceback
        if service_of(e) is None:
            raise
        print(f"ipab: error: {service_error_line(e)}", file=sys.stderr)
        return 2
    return code


def _log_format() -> str:
    """IPAB_LOG_FORMAT; text while the settings are invalid (the command then reports them in one line)."""
    from shared.settings import load_settings

    try:
        return load_settings().log_format
    except IpabError:
        return "text"


def service_of(error: BaseException) -> tuple[str, str] | None:
    """(setting, service) of the database, Redis or S3 failure `error` is; None for any other error."""
    for module_name, class_names, field, what in SERVICE_ERRORS:
        module = sys.modules.get(module_name)
        if module is not None and isinstance(error, tuple(getattr(module, name) for name in class_names)):
            return field, what
    return None


def service_error_line(error: BaseException) -> str:
    """One line for a database, Redis or S3 failure no command translated: the variable, its masked value, the fix."""
    from shared.settings import load_settings

    field, what = service_of(error) or ("s3_endpoint_url", "the object store")
    name = f"IPAB_{field.upper()}"
    try:
        shown = mask_url(getattr(load_settings(), field))
    except IpabError:
        shown = "?"
    reason = getattr(error, "orig", None) or error
    lines = str(reason).strip().splitlines() or [type(error).__name__]
    return (
        f"{what} at {name}={shown} failed ({type(error).__name__}: {mask_text(lines[0])}); "
        f"check that it runs and accepts connections, or fix {name}"
    )


if __name__ == "__main__":
    sys.exit(main())
