"""What every command shares: the one error path, loading a model, and the library's arguments from the options."""

from __future__ import annotations

import contextlib
import os
import sys
from enum import Enum
from pathlib import Path

import typer

from .. import host
from ..errors import UsageError, UserError


def fail(message: str, code: int = 1):
    """One sentence on stderr and a non-zero exit: how every user error ends. Under `accelerate launch` every rank
    meets the same error; only the main one says it."""
    if os.environ.get("RANK", "0") == "0":
        typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


@contextlib.contextmanager
def reported():
    """Turn the library's user errors into `fail`: exit 2 for settings that cannot work together, else 1."""
    try:
        yield
    except UsageError as e:
        fail(str(e), 2)
    except (UserError, FileNotFoundError, PermissionError) as e:
        if getattr(e, "filename", None) == STDOUT:
            drop_stdout()
        fail(str(e))


STDOUT = "standard output"  # the name write errors on stdout go by (files.guarded)


def drop_stdout():
    """Point stdout at /dev/null: what is still buffered for a stdout that failed (a full disk, a closed pipe)
    would fail again when Python flushes it at exit, with a second message and exit status 120."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)


def weights_missing(weights) -> bool:
    """A local weights path that does not exist (a Hub id is checked when it is fetched)."""
    from ..hub import is_hub_id

    return weights is not None and not is_hub_id(weights) and not Path(weights).exists()


def quiet_libraries():
    """Keep library chatter (accelerate, torch) off the user's screen; Python warnings print as one line."""
    import logging
    import warnings

    logging.getLogger("accelerate").setLevel(logging.ERROR)
    logging.getLogger("huggingface_hub").setLevel(logging.ERROR)  # its retries log each request; our error says it
    warnings.formatwarning = lambda message, category, *args, **kwargs: f"warning: {message}\n"


def load_model(weights: Path):
    """The model from any weights maecli reads, on the best device; host tuning where that device is the CPU."""
    import maecli

    from ..runtime import default_device

    device = default_device()
    host.tune_for_cpu(device)
    return maecli.load(weights).to(device)


def workers_or_default(workers: int | None) -> int:
    from ..runtime import default_workers

    return default_workers() if workers is None else workers


def command_args(ctx: typer.Context, cls, **overrides):
    """A training command's arguments dataclass from its parsed options: choices by value, paths as strings."""
    import dataclasses

    def plain(value):
        if isinstance(value, Enum):
            return value.value
        if isinstance(value, Path):
            return str(value)
        if isinstance(value, list | tuple):
            return tuple(plain(v) for v in value)
        return value

    names = {f.name for f in dataclasses.fields(cls)} - set(overrides)
    return cls(**{k: plain(v) for k, v in ctx.params.items() if k in names}, **overrides)


def given_flags(ctx: typer.Context) -> set[str]:
    """The options the user set explicitly: on --resume, those a run may change override its saved settings.
    (By name: typer may bundle its own copy of click, whose ParameterSource is another class.)"""
    return {
        name
        for name in ctx.params
        if getattr(ctx.get_parameter_source(name), "name", "") in ("COMMANDLINE", "ENVIRONMENT")
    }


def stdout_closed_early():
    """The reader (`head`, a closed pager) has what it wanted: stop quietly with success.

    Pointing stdout at /dev/null keeps Python from failing again when it flushes stdout at exit.
    """
    drop_stdout()
    raise typer.Exit(0)
