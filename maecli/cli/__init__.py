"""The `maecli` command line: parse, validate at the boundary, call the library, format the result.

torch, timm and friends are imported inside the commands, so `--help` and argument errors stay fast.
Every user error ends as one line `error: ...` on stderr: exit 2 for a bad command line, 1 for anything else.

Here: the app, its root options and main(). options.py declares the options several commands share; common.py
holds the one error path (reported, fail); the commands live in training.py, inference.py and runs.py.
"""

from __future__ import annotations

import contextlib
import os
import sys
from typing import Annotated

import typer

from .. import host
from . import inference, runs, training
from .common import drop_stdout
from .options import Command

app = typer.Typer(
    name="maecli",
    help="Masked Autoencoder (MAE) pretraining on plain image folders, and tools to use the result.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    # plain click help: typer's rich formatter imports rich.markdown and pygments on every `--help`, and its markup
    # would swallow literal "[default: ...]" in option help
    rich_markup_mode=None,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def show_version(value: bool):
    if value:
        from .. import __version__

        typer.echo(f"maecli {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool,
        typer.Option("--version", is_eager=True, expose_value=False, callback=show_version, help="Print the version."),
    ] = False,
):
    """Masked Autoencoder (MAE) pretraining on plain image folders, and tools to use the result."""
    host.configure_openmp()  # before any command imports torch: libgomp reads it once
    exit_on_sigterm()


def exit_on_sigterm():
    """SIGTERM ends any command with exit status 143 the way an error does: `finally` blocks run, so temporary
    files go and loader workers stop. (Killed by the signal, a process leaves both behind.) Training loops catch
    it themselves for a clean checkpoint, and put this back when they end: teardown exits 143 too."""
    import signal

    def terminated(signum, frame):
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a repeated SIGTERM does not cut the clean-up short
        with contextlib.suppress(OSError):
            sys.stderr.write("terminated (SIGTERM)\n")
        raise SystemExit(143)

    with contextlib.suppress(ValueError):  # not the main thread (an embedding application): leave it alone
        signal.signal(signal.SIGTERM, terminated)


# the order `maecli --help` lists them in: a user's workflow, from pretraining to serving the model, then the tool
# that repacks a big folder
for command in (
    training.pretrain,
    inference.reconstruct,
    inference.embed,
    inference.probe,
    training.finetune,
    inference.predict,
    runs.export,
    runs.plot,
    runs.info,
    inference.serve,
    training.shard,
):
    app.command(cls=Command)(command)


def block_sigterm():
    """Hold back a SIGTERM from here to the end: Python's finalization puts the default handlers back, and a signal
    arriving then would kill the process (status -15) after the command has already ended with its own."""
    import signal

    with contextlib.suppress(AttributeError, ValueError, OSError):
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})


def main():
    import atexit

    exit_on_sigterm()
    atexit.register(block_sigterm)  # registered before any library's hook, so it runs after all of them
    try:
        app()
    except OSError as e:  # a write to stdout or stderr that failed outside any command's own handling
        drop_stdout()
        with contextlib.suppress(OSError):
            sys.stderr.write(f"error: {e.strerror or e}{f': {e.filename}' if e.filename else ''}\n")
        sys.exit(1)
    finally:
        # The command is over; what is left is the interpreter's own exit (atexit hooks, library finalizers), where
        # an exception would only print a traceback: a SIGTERM now ends the process at once, with 143.
        import signal

        def now(signum, frame):
            with contextlib.suppress(Exception):
                sys.stdout.flush()
            os._exit(143)

        with contextlib.suppress(ValueError):
            signal.signal(signal.SIGTERM, now)
