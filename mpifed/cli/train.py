"""`mpifed simulate` (a whole federation on this machine, under one mpiexec it starts) and `mpifed run`
(the per-rank program that mpiexec or srun starts, one launch for every facility or one per facility).

Nothing is written before the whole configuration has been validated and checked against this machine.
"""
from __future__ import annotations

import dataclasses
import os
import shlex
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any, NoReturn

import click

from mpifed import STOPPED_EXIT, configfile, logs
from mpifed.cli.common import (
    JobFailed,
    UserError,
    check_writable,
    key_help,
    load_config,
    read_config_file,
    resume_option,
    set_option,
)
from mpifed.config import (CheckpointConfig, ConfigError, FederationConfig, RunConfig, TrainConfig,
                           default_facilities)
from mpifed.run.metrics import PROGRESS_ENV

_DEFAULT = RunConfig()  # what a run without a config file or flags gets; help reads its defaults


def _resolve(config_file: Path | None, flags: dict[str, Any], sets: tuple[str, ...],
             facilities: int | None = None, ranks: int | None = None) -> RunConfig:
    """defaults < config file < command-line flags < --set, validated as a whole."""
    data = read_config_file(config_file) if config_file else {}
    if facilities is not None and "facility" in data:
        raise UserError(f"--facilities: {config_file} already lists its [[facility]] tables; "
                        "change them there or with --set facility.NAME.KEY=VALUE")
    if "facility" not in data:
        data["facility"] = [dataclasses.asdict(f) for f in default_facilities(facilities or len(_DEFAULT.facility))]
    if ranks is not None:
        data["facility"] = [{**f, "ranks": ranks} for f in data["facility"]]
    for key, value in flags.items():
        if value is not None:
            section, name = key.split(".")
            data.setdefault(section, {})[name] = value
    return load_config(data, sets)


def _prepare_output(cfg: RunConfig, overwrite: bool, resume: str) -> Path:
    """Check, then create, the output folder; returns the path of the resolved config inside it."""
    out = Path(cfg.checkpoint.dir)
    check_writable(out, "--out (checkpoint.dir)", is_dir=True)
    check_writable(cfg.metrics_path, "--metrics (metrics.file)", is_dir=False)
    from mpifed.checkpoint import format as checkpoint  # h5py, only once the cheap checks have passed

    if overwrite and resume:
        raise UserError("--overwrite and --resume exclude each other: replace the old checkpoints or continue them")
    if resume not in ("", "auto") and not Path(resume).exists():
        raise UserError(f"--resume: {resume} does not exist (give a checkpoint file, a folder, or auto)")
    if not overwrite and not resume and out.is_dir() and checkpoint.main_files(out):
        raise UserError(f"--out: {out} already holds checkpoints of an earlier run; choose another folder, "
                        "pass --resume auto to continue it, or --overwrite to replace them")
    if resume:
        _refuse_a_changed_run(cfg, Path(cfg.checkpoint.dir) if resume == "auto" else Path(resume),
                              f"continue it with its own configuration (--config {Path(cfg.checkpoint.dir) / 'mpifed.toml'}"
                              "), or start a new run in another --out")
    try:
        text = configfile.dump_toml(cfg)
    except ConfigError as exc:  # a value TOML cannot hold: said before anything is written
        raise UserError(str(exc)) from None
    try:
        out.mkdir(parents=True, exist_ok=True)
        if overwrite:
            for old in [*out.glob("round_*.h5"), out / checkpoint.LATEST]:
                old.unlink(missing_ok=True)
        resolved = out / "mpifed.toml"
        resolved.write_text(text, encoding="utf-8")
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


# What a resumed run cannot change: its model's shapes (the vocabulary comes with the data), its
# adapters, its facilities, its inner optimizer's kind and its outer optimizer's state.
_FIXED_ON_RESUME = ("model.preset", "model.path", "data.path", "lora.rank", "lora.target_modules",
                    "train.optimizer", "federation.outer")


def _refuse_a_changed_run(cfg: RunConfig, target: Path, fix: str) -> None:
    """Before anything is written or started: the newest checkpoint a resume from `target` would read
    was trained with a configuration that differs where a resume cannot follow? Then one line saying
    what differs and the `fix`. (The ranks check the model's layout again after they start.)"""
    import tomllib

    from mpifed.checkpoint import format as checkpoint
    from mpifed.checkpoint import isolated
    from mpifed.checkpoint.format import CheckpointError

    for path in checkpoint.candidates(target)[:3]:  # the first that reads; damaged ones the ranks skip, named
        try:
            saved = configfile.from_dict(tomllib.loads(isolated.verify(path, check_data=False, facilities="none").config))
        except (CheckpointError, ValueError):  # unreadable, or written by another version: the ranks decide
            continue
        diffs = [f"{key} {configfile.setting(saved, key)!r} -> {configfile.setting(cfg, key)!r}" for key in _FIXED_ON_RESUME
                 if configfile.setting(saved, key) != configfile.setting(cfg, key)]
        ours, theirs = [(f.name, f.ranks) for f in cfg.facility], [(f.name, f.ranks) for f in saved.facility]
        if ours != theirs:
            diffs.append(f"facilities (name, ranks) {theirs} -> {ours}")
        if diffs:
            raise UserError(f"--resume: {path.name} was trained with another {', '.join(diffs)}; {fix}; nothing "
                            "was written")
        return


def simulate_command(cfg: RunConfig, config_path: Path, resume: str = "") -> list[str]:
    """An MPMD mpiexec line: one program per facility, so MPI_APPNUM tells each rank its facility."""
    program = [sys.executable, "-m", "mpifed", "run", str(config_path)] + (["--resume", resume] if resume else [])
    command = [_mpiexec()]
    for i, facility in enumerate(cfg.facility):
        command += ([":"] if i else []) + ["-n", str(facility.ranks), *program]
    return command


def _run_forwarding_stops(command: list[str], env: dict[str, str]) -> int:
    """Run mpiexec; a planned-stop signal sent to this process goes on to it (and from it to the ranks)."""
    from mpifed.run.stop import SIGNALS

    proc = subprocess.Popen(command, env=env, stdin=subprocess.DEVNULL)
    before = {sig: signal.signal(sig, lambda number, _: proc.send_signal(number)) for sig in SIGNALS}
    try:
        return proc.wait()
    except BaseException:  # Ctrl-C: as subprocess.run does, the job goes with this process
        proc.kill()
        proc.wait()
        raise
    finally:
        for sig, handler in before.items():
            signal.signal(sig, handler)


def _rank_environment(cfg: RunConfig) -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("HF_HUB_OFFLINE", "1")  # models are built from configs; never reach for a hub
    env.setdefault("PYTHONUNBUFFERED", "1")  # progress lines appear as they happen
    env.setdefault("TRANSFORMERS_VERBOSITY", "error")
    # All ranks share this machine: one BLAS/OpenMP thread pool per rank, sized to the cores.
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // cfg.total_ranks)))
    # The ranks' output reaches this terminal through mpiexec's pipes: tell them whether it is one.
    env.setdefault(PROGRESS_ENV, "1" if sys.stdout.isatty() else "0")
    return env


@click.command()
@click.option("--config", "config_file", type=click.Path(dir_okay=False, path_type=Path),
              help="Run configuration (TOML); flags and --set override its keys.")
@click.option("--facilities", type=click.IntRange(min=1),
              help=f"Number of facilities f0, f1, ...  [default: {len(_DEFAULT.facility)}]")
@click.option("--ranks-per-facility", type=click.IntRange(min=1),
              help=f"MPI ranks in each facility.  [default: {_DEFAULT.facility[0].ranks}]")
@click.option("--rounds", type=click.IntRange(min=1),
              help=key_help("Federated rounds", FederationConfig, "rounds", "federation.rounds"))
@click.option("--local-steps", type=click.IntRange(min=1),
              help=key_help("Inner steps per round, H", TrainConfig, "local_steps", "train.local_steps"))
@click.option("--out", type=click.Path(path_type=Path),
              help=key_help("Output folder: checkpoints, resolved config, metrics", CheckpointConfig, "dir",
                            "checkpoint.dir"))
@click.option("--metrics", type=click.Path(path_type=Path),
              help="JSON-lines metrics file, one line per round (metrics.file).  [default: OUT/metrics.jsonl]")
@click.option("--seed", type=click.IntRange(min=0),
              help=key_help("Seed for initialisation and data order", TrainConfig, "seed", "train.seed"))
@set_option
@click.option("--overwrite", is_flag=True, help="Replace the checkpoints of an earlier run in --out.")
@resume_option
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
    cfg = _resolve(config_file, flags, sets, facilities, ranks_per_facility)
    from mpifed.preflight import one_machine_problems

    too_much = one_machine_problems(cfg)
    if too_much:
        raise UserError(too_much[0])
    if dry_run:
        click.echo(configfile.dump_toml(cfg), nl=False)
        click.echo(shlex.join(simulate_command(cfg, Path(cfg.checkpoint.dir) / "mpifed.toml", resume)))
        return 0
    command = simulate_command(cfg, _prepare_output(cfg, overwrite, resume),
                               cfg.checkpoint.dir if resume == "auto" else resume)
    if logs.chatty():
        click.echo(f"mpifed simulate: {shlex.join(command)}", err=True)
    try:
        code = _run_forwarding_stops(command, _rank_environment(cfg))
    except KeyboardInterrupt:
        raise UserError("interrupted; the last completed checkpoint is kept") from None
    if code == STOPPED_EXIT:  # a planned stop: the ranks said after which round
        click.echo(f"mpifed simulate: stopped early on request; continue with --resume auto --out {cfg.checkpoint.dir}",
                   err=True)
        return STOPPED_EXIT
    if code == UserError.exit_code:  # the ranks found bad input (a model folder, a checkpoint): said above
        raise UserError(f"the MPI job stopped on bad input (see the message above); completed checkpoints are "
                        f"kept in {cfg.checkpoint.dir}")
    if code != 0:
        raise JobFailed(f"the MPI job failed with exit code {code} (see the messages above); "
                        f"completed checkpoints are kept in {cfg.checkpoint.dir}")
    return 0


@click.command()
@click.argument("config_file", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--facility", default="", metavar="NAME",
              help="This launch is facility NAME alone; it joins the others at the hub's door (the first "
                   "facility listed is the hub). Needs MPIFED_TOKEN or federation.token_file.")
@click.option("--port", default="", metavar="HOST:PORT",
              help="With --facility: the address of the door the hub printed (instead of federation.rendezvous).")
@set_option
@resume_option
def run(config_file: Path, facility: str, port: str, sets: tuple[str, ...], resume: str) -> NoReturn:
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
    cfg = load_config(read_config_file(config_file), sets)
    if port and not facility:
        raise UserError("--port: only with --facility (a launch of one facility joining the others)")
    # every site writes its own part of each checkpoint here: say so now, before MPI starts, not at the
    # first checkpoint
    check_writable(Path(cfg.checkpoint.dir), "checkpoint.dir", is_dir=True)
    resume = cfg.checkpoint.dir if resume == "auto" else resume
    if resume:  # every rank reads the same file to the same verdict: all stop alike, before MPI starts
        _refuse_a_changed_run(cfg, Path(resume), f"resume with the configuration it was trained with (`mpifed ckpt "
                              f"inspect --config {resume}` prints it), or give this one its own checkpoint.dir")
    Path(cfg.checkpoint.dir).mkdir(parents=True, exist_ok=True)
    from mpifed.run import rank  # imports MPI: only here, never for --help

    rank.end(rank.main_joined(cfg, facility, port, resume) if facility else rank.main(cfg, resume))

