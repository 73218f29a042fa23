"""What every `mpifed` command shares: the two failure kinds and their exit codes, the options several
commands take (`--set`, `--resume`), help texts that read their defaults from the configuration's
dataclasses (so help cannot drift from what runs), loading a configuration, and checking that an
output path can be written before anything is.
"""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any, Callable

import click

from mpifed import configfile, preflight
from mpifed.config import ConfigError, RunConfig


class Failure(click.ClickException):
    """An error `main` prints as one line naming the command it happened in."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.ctx = click.get_current_context(silent=True)


class UserError(Failure):
    """A mistake in the user's input: exit code 2."""

    exit_code = 2


class JobFailed(Failure):
    """The MPI job or a checkpoint failed: exit code 1."""

    exit_code = 1


_RANK_VARIABLES = ("PMI_RANK", "PMIX_RANK", "SLURM_PROCID", "OMPI_COMM_WORLD_RANK")


def launch_rank() -> int:
    """This process's rank in its launch, as the launcher (mpiexec, srun) tells it before MPI starts;
    0 when started by hand."""
    for name in _RANK_VARIABLES:
        if os.environ.get(name, "").isdigit():
            return int(os.environ[name])
    return 0


def set_option(f: Callable) -> Callable:
    """--set SECTION.KEY=VALUE, repeatable: any configuration key."""
    return click.option("--set", "sets", multiple=True, metavar="SECTION.KEY=VALUE",
                        help="Override any configuration key, e.g. --set train.lr=3e-4 or "
                             "--set facility.f1.ranks=3 (repeatable).")(f)


def resume_option(f: Callable) -> Callable:
    """--resume auto|PATH."""
    return click.option("--resume", default="", metavar="auto|PATH",
                        help="Continue from a checkpoint: auto takes the newest one in the output folder that "
                             "verifies (saying which it skipped and why); PATH names a file or folder.")(f)


def default_of(section: type, key: str) -> Any:
    """The default of configuration field `key` of dataclass `section`."""
    f = next(f for f in dataclasses.fields(section) if f.name == key)
    return f.default if f.default is not dataclasses.MISSING else f.default_factory()


def key_help(text: str, section: type, key: str, name: str) -> str:
    """Help for an option that sets configuration key `name`, with the key's real default."""
    return f"{text} ({name}).  [default: {default_of(section, key)}]"


def read_config_file(path: Path) -> dict[str, Any]:
    """A TOML run configuration as parsed data; a missing or malformed file is a UserError naming it."""
    try:
        return configfile.load(path)
    except ConfigError as exc:
        raise UserError(str(exc)) from None


def load_config(data: dict[str, Any], sets: tuple[str, ...] = (), here: bool = True) -> RunConfig:
    """A configuration from parsed TOML and --set overrides, valid and runnable here (here=False: valid,
    for other machines: see preflight.problems); else UserError."""
    try:
        return preflight.checked(configfile.from_dict(configfile.apply_sets(data, list(sets))), here)
    except ConfigError as exc:
        raise UserError(str(exc)) from None


def first_existing(path: Path) -> Path:
    """`path`, or its nearest parent that exists (where a folder not made yet would be made)."""
    path = path.absolute()
    while not path.exists():
        path = path.parent
    return path


def check_writable(path: Path, option: str, is_dir: bool) -> None:
    """Fail, naming `option`, unless `path` can be created or written (checked without writing)."""
    base = first_existing(path)
    if base == path.absolute():
        if is_dir and not path.is_dir():
            raise UserError(f"{option}: {path} exists and is not a folder")
        if not is_dir and path.is_dir():
            raise UserError(f"{option}: {path} is a folder, expected a file")
        base = path if is_dir else path.parent
    if not base.is_dir():
        raise UserError(f"{option}: cannot create {path}: {base} is not a folder")
    if not os.access(base, os.W_OK | os.X_OK):
        raise UserError(f"{option}: cannot write to {path}: no write permission on {base}")
