"""The `mpifed` command: a small table of subcommands that parse, validate and hand over.

  simulate   run a whole federation on this machine (starts mpiexec itself)
  run        the per-rank program, started by mpiexec/srun with a config file
  data       prepare text into a tokenized, partitioned dataset folder (data.path)
  ckpt       inspect, verify and export checkpoints

Every error a user can cause is printed as one line naming the option, key or file, with a non-zero
exit and no traceback; nothing is written before the whole configuration has been validated.
"""
from __future__ import annotations

import dataclasses
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import click

from mpifed import __version__, config, configfile
from mpifed.config import ConfigError, RunConfig


class _Failure(click.ClickException):
    """An error `main` prints as one line naming the command it happened in."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.ctx = click.get_current_context(silent=True)


class UserError(_Failure):
    """A mistake in the user's input: exit code 2."""

    exit_code = 2


class _JobFailed(_Failure):
    """The MPI job or a checkpoint failed: exit code 1."""

    exit_code = 1


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="mpifed")
def cli() -> None:
    """Train one language model across several HPC facilities over MPI.

    Each facility trains locally; every H steps the facilities' roots average what they learned
    (weighted by tokens), apply an outer optimizer and checkpoint the global model to HDF5.
    """


def _resume_option(f):
    return click.option("--resume", default="", metavar="auto|PATH",
                        help="Continue from a checkpoint: auto takes the newest one in the output folder that "
                             "verifies (saying which it skipped and why); PATH names a file or folder.")(f)


def _set_option(f):
    return click.option("--set", "sets", multiple=True, metavar="SECTION.KEY=VALUE",
                        help="Override any configuration key, e.g. --set train.lr=3e-4 or "
                             "--set facility.f1.ranks=3 (repeatable).")(f)


def _resolve(config_file: Path | None, flags: dict[str, Any], sets: tuple[str, ...],
             facilities: int | None = None, ranks: int | None = None) -> RunConfig:
    """defaults < config file < command-line flags < --set, validated as a whole."""
    data = configfile.load(config_file) if config_file else {}
    if facilities is not None and "facility" in data:
        raise UserError(f"--facilities: {config_file} already lists its [[facility]] tables; "
                        "change them there or with --set facility.NAME.KEY=VALUE")
    if facilities is not None or ranks is not None or "facility" not in data:
        listed = data.get("facility") or [dataclasses.asdict(f) for f in config.default_facilities(facilities or 2, ranks or 2)]
        data["facility"] = [{**f, "ranks": ranks} if ranks is not None else f for f in listed]
    for key, value in flags.items():
        if value is not None:
            section, name = key.split(".")
            data.setdefault(section, {})[name] = value
    return configfile.from_dict(configfile.apply_sets(data, list(sets)))


def _first_existing(path: Path) -> Path:
    path = path.absolute()
    while not path.exists():
        path = path.parent
    return path


def _check_writable(path: Path, option: str, is_dir: bool) -> None:
    """Fail, naming `option`, unless `path` can be created or written (checked without writing)."""
    base = _first_existing(path)
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


def _prepare_output(cfg: RunConfig, overwrite: bool, resume: str) -> Path:
    """Check, then create, the output folder; returns the path of the resolved config inside it."""
    out = Path(cfg.checkpoint.dir)
    _check_writable(out, "--out (checkpoint.dir)", is_dir=True)
    _check_writable(cfg.metrics_path, "--metrics (metrics.file)", is_dir=False)
    from mpifed import checkpoint  # h5py, only once the cheap checks have passed

    if overwrite and resume:
        raise UserError("--overwrite and --resume exclude each other: replace the old checkpoints or continue them")
    if resume not in ("", "auto") and not Path(resume).exists():
        raise UserError(f"--resume: {resume} does not exist (give a checkpoint file, a folder, or auto)")
    if not overwrite and not resume and out.is_dir() and checkpoint.main_files(out):
        raise UserError(f"--out: {out} already holds checkpoints of an earlier run; choose another folder, "
                        "pass --resume auto to continue it, or --overwrite to replace them")
    try:
        out.mkdir(parents=True, exist_ok=True)
        if overwrite:
            for old in [*out.glob("round_*.h5"), out / checkpoint.LATEST]:
                old.unlink(missing_ok=True)
        resolved = out / "mpifed.toml"
        resolved.write_text(configfile.dump_toml(cfg))
    except OSError as exc:
        raise UserError(f"--out: cannot write to {out}: {exc.strerror or exc}") from None
    return resolved


def _mpiexec() -> str:
    """MPIFED_MPIEXEC, else the mpiexec installed beside this Python (the MPICH wheel), else PATH's."""
    if os.environ.get("MPIFED_MPIEXEC"):
        return os.environ["MPIFED_MPIEXEC"]
    beside = Path(sys.executable).parent / "mpiexec"
    found = str(beside) if beside.exists() else shutil.which("mpiexec")
    if not found:
        raise UserError("no mpiexec found: install the embedded MPI (pip install mpich) or set MPIFED_MPIEXEC")
    return found


def simulate_command(cfg: RunConfig, config_path: Path, resume: str = "") -> list[str]:
    """An MPMD mpiexec line: one program per facility, so MPI_APPNUM tells each rank its facility."""
    program = [sys.executable, "-m", "mpifed", "run", str(config_path)] + (["--resume", resume] if resume else [])
    command = [_mpiexec()]
    for i, facility in enumerate(cfg.facility):
        command += ([":"] if i else []) + ["-n", str(facility.ranks), *program]
    return command


def _rank_environment(cfg: RunConfig) -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("HF_HUB_OFFLINE", "1")  # models are built from configs; never reach for a hub
    env.setdefault("PYTHONUNBUFFERED", "1")  # progress lines appear as they happen
    env.setdefault("TRANSFORMERS_VERBOSITY", "error")
    # All ranks share this machine: one BLAS/OpenMP thread pool per rank, sized to the cores.
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // cfg.total_ranks)))
    return env


@cli.command()
@click.option("--config", "config_file", type=click.Path(dir_okay=False, path_type=Path),
              help="Run configuration (TOML); flags and --set override its keys.")
@click.option("--facilities", type=click.IntRange(min=1), help="Number of facilities f0, f1, ...  [default: 2]")
@click.option("--ranks-per-facility", type=click.IntRange(min=1), help="MPI ranks in each facility.  [default: 2]")
@click.option("--rounds", type=click.IntRange(min=1), help="Federated rounds (federation.rounds).  [default: 5]")
@click.option("--local-steps", type=click.IntRange(min=1),
              help="Inner steps per round, H (train.local_steps).  [default: 20]")
@click.option("--out", type=click.Path(path_type=Path),
              help="Output folder: checkpoints, resolved config, metrics (checkpoint.dir).  [default: run]")
@click.option("--metrics", type=click.Path(path_type=Path),
              help="JSON-lines metrics file, one line per round (metrics.file).  [default: OUT/metrics.jsonl]")
@click.option("--seed", type=click.IntRange(min=0), help="Seed for initialisation and data order (train.seed).")
@_set_option
@click.option("--overwrite", is_flag=True, help="Replace the checkpoints of an earlier run in --out.")
@_resume_option
@click.option("--dry-run", is_flag=True, help="Print the resolved configuration and the mpiexec line, run nothing.")
def simulate(config_file: Path | None, facilities: int | None, ranks_per_facility: int | None, rounds: int | None,
             local_steps: int | None, out: Path | None, metrics: Path | None, seed: int | None,
             sets: tuple[str, ...], overwrite: bool, resume: str, dry_run: bool) -> int:
    """Run a whole federation on this machine: every facility's ranks under one mpiexec.

    With no options: 2 facilities x 2 ranks train the tiny LLaMA on the embedded text for 5 rounds,
    checkpoints in ./run. The global root prints one line per round.
    """
    flags = {"federation.rounds": rounds, "train.local_steps": local_steps, "train.seed": seed,
             "checkpoint.dir": str(out) if out is not None else None,
             "metrics.file": str(metrics) if metrics is not None else None}
    try:
        cfg = _resolve(config_file, flags, sets, facilities, ranks_per_facility)
    except ConfigError as exc:
        raise UserError(str(exc)) from None
    if dry_run:
        click.echo(configfile.dump_toml(cfg), nl=False)
        click.echo(shlex.join(simulate_command(cfg, Path(cfg.checkpoint.dir) / "mpifed.toml", resume)))
        return 0
    command = simulate_command(cfg, _prepare_output(cfg, overwrite, resume),
                               cfg.checkpoint.dir if resume == "auto" else resume)
    click.echo(f"mpifed simulate: {shlex.join(command)}", err=True)
    try:
        code = subprocess.run(command, env=_rank_environment(cfg), stdin=subprocess.DEVNULL).returncode
    except KeyboardInterrupt:
        raise UserError("interrupted; the last completed checkpoint is kept") from None
    if code != 0:
        raise _JobFailed(f"the MPI job failed with exit code {code} (see the messages above); "
                                   f"completed checkpoints are kept in {cfg.checkpoint.dir}")
    return 0


@cli.command()
@click.argument("config_file", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--facility", default="", metavar="NAME",
              help="This launch is facility NAME alone; it joins the others over an MPI port (the first "
                   "facility listed is the hub). Needs MPIFED_TOKEN or federation.token_file.")
@click.option("--port", default="", metavar="PORT",
              help="With --facility: the MPI port name the hub printed (instead of federation.rendezvous).")
@_set_option
@_resume_option
def run(config_file: Path, facility: str, port: str, sets: tuple[str, ...], resume: str) -> int:
    """The per-rank program: start it under mpiexec or srun with the run configuration.

    \b
    One launch for every facility:
      mpiexec -n 2 mpifed run mpifed.toml : -n 2 mpifed run mpifed.toml
    Ranks are assigned to facilities by MPMD program number, or else in the order of the
    [[facility]] tables by their `ranks`.
    \b
    One launch per facility (each site its own batch job), joined over MPI ports:
      site A:  srun -n 4 mpifed run mpifed.toml --facility leonardo     (the hub: listed first)
      site B:  srun -n 2 mpifed run mpifed.toml --facility lumi
    """
    try:
        cfg = configfile.from_dict(configfile.apply_sets(configfile.load(config_file), list(sets)))
    except ConfigError as exc:
        raise UserError(str(exc)) from None
    if port and not facility:
        raise UserError("--port: only with --facility (a launch of one facility joining the others)")
    from mpifed import entry  # imports MPI: only here, never for --help

    resume = cfg.checkpoint.dir if resume == "auto" else resume
    if facility:
        return entry.main_joined(cfg, facility, port, resume)
    return entry.main(cfg, resume)


from mpifed import cli_files  # noqa: E402,F401  (registers data, ckpt, sites and config on `cli`)


def main(argv: list[str] | None = None) -> None:
    """Console entry point: click errors become one line `mpifed CMD: error: ...` and exit code 2."""
    argv = sys.argv[1:] if argv is None else argv
    try:
        code = cli.main(args=argv, prog_name="mpifed", standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("mpifed: aborted", err=True)
        sys.exit(130)
    except click.ClickException as exc:
        if getattr(exc, "ctx", None) is not None:
            where = exc.ctx.command_path
        else:  # parser errors come without a context
            where = " ".join(["mpifed", *[a for a in argv[:1] if a in cli.commands]])
        click.echo(f"{where}: error: {exc.format_message()}", err=True)
        sys.exit(exc.exit_code)
    sys.exit(code if isinstance(code, int) else 0)
