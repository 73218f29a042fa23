"""The per-rank program that `mpifed run` executes under mpiexec/srun: the only code that touches
`MPI.COMM_WORLD`. Build topology -> train -> close; any failure on any rank aborts the job, and a
planned stop (mpifed/run/stop.py) exits with STOPPED_EXIT after checkpointing its round.

Two ways in: one launch holding every facility (`main`), or one launch per facility that join over
MPI ports (`main_joined`, with `--facility NAME`). Either way the rank then ends through `end`."""
from __future__ import annotations

import dataclasses
import os
import sys
from typing import Collection, NoReturn

from mpi4py import MPI

from mpifed import STOPPED_EXIT
from mpifed.comm import control, topology, watchdog
from mpifed.comm.rollcall import RollCall
from mpifed.comm.watchdog import abort_on_error
from mpifed.config import RunConfig
from mpifed.run import stop


def end(code: int) -> NoReturn:
    """End this rank with `code` once its work is durable: flush, finalize MPI, and leave without the
    interpreter's teardown. gloo's worker threads live as long as anything still refers to a process
    group (a device mesh, DeepSpeed's groups), and tearing them down in the interpreter's order now and
    then aborts a process after a run that succeeded ("terminate called without an active exception"),
    which the launcher, and a batch script deciding whether to restart, would read as a failure."""
    sys.stdout.flush()
    sys.stderr.flush()
    if MPI.Is_initialized() and not MPI.Is_finalized():
        MPI.Finalize()
    os._exit(code)


def _refuse_to_mix_runs(comm: MPI.Intracomm, cfg: RunConfig, resume: str) -> None:
    """A fresh run must not write into a folder holding another run's checkpoints: its rounds would
    replace some of them, and a later --resume auto could pick up the other run's newest."""
    if resume:
        return
    from mpifed.checkpoint.format import round_files

    found = control.bcast_int(comm, len(round_files(cfg.checkpoint.dir)) if comm.rank == 0 else None)
    if found:
        raise ValueError(f"checkpoint.dir {cfg.checkpoint.dir} already holds {found} checkpoint file(s) of an "
                         "earlier run; pass --resume auto to continue it, or choose another folder")


def _train(cfg: RunConfig, world: MPI.Intracomm, index: int, resume: str, elastic: bool = False) -> int:
    """Train every round (or up to a planned stop); the rank's exit code. `elastic` (separate launches):
    a facility asked to stop may leave while the others go on; the world is then split, and the
    leavers disconnected, so that nothing waits on them again."""
    from mpifed.run.trainer import Trainer  # heavy imports (torch, transformers) only once MPI is up

    trainer = None
    while True:
        with abort_on_error(world, expected=_expected_errors()):
            topo = topology.build(world, index, [f.name for f in cfg.facility], cfg.federation.roots)
            roll = RollCall(topo.world, topo.facility_offsets, topo.facility_names)
            watchdog.install(roll)  # from here a failure names the facility that was lost
            if trainer is None:
                trainer = Trainer(cfg, topo, resume, elastic)
            else:
                trainer.regroup(cfg, topo)
            trainer.run()
            watchdog.install(None)
            roll.close()
            if not trainer.leaving:
                break
            trainer.release()
            stays = topo.facility_name not in trainer.leaving
            rest = world.Split(0 if stays else MPI.UNDEFINED, key=world.rank)
            topo.close()
            world.Disconnect()  # collective with the leavers, the last thing they do with the others
        if not stays:
            trainer.close()
            return STOPPED_EXIT
        cfg = _keeping(cfg, [name for name in topo.facility_names if name not in trainer.leaving])
        world, index = rest, [f.name for f in cfg.facility].index(topo.facility_name)
    trainer.close()
    topo.close()
    return 0 if trainer.stopped_after is None else STOPPED_EXIT


def _keeping(cfg: RunConfig, names: Collection[str]) -> RunConfig:
    """The configuration of only the facilities `names` (those that joined, or stay after others
    left), each keeping its data partition; `cfg` itself when it lists no others."""
    present = [dataclasses.replace(f, partition=cfg.partition_of(i)) if cfg.data.path else f
               for i, f in enumerate(cfg.facility) if f.name in names]
    return cfg if len(present) == len(cfg.facility) else dataclasses.replace(cfg, facility=present)


def main(cfg: RunConfig, resume: str = "") -> int:
    """`mpifed run CONFIG`: every facility in this one launch (MPMD program number, or listing order)."""
    comm = MPI.COMM_WORLD
    stop.install()
    try:
        appnum = comm.Get_attr(MPI.APPNUM)
        indices = topology.facility_of_ranks([f.ranks for f in cfg.facility],
                                             control.allgather_int(comm, appnum or 0))
        _refuse_to_mix_runs(comm, cfg, resume)
    except ValueError as exc:  # the same on every rank: say it once, exit cleanly
        if comm.rank == 0:
            print(f"mpifed run: error: {exc}", file=sys.stderr, flush=True)
        return 2
    return _train(cfg, comm, indices[comm.rank], resume)


def _expected_errors() -> tuple[type[BaseException], ...]:
    """Failures that are a situation, not a bug: printed as their message alone."""
    from mpifed.checkpoint.format import CheckpointError
    from mpifed.comm.topology import NetworkError
    from mpifed.data.corpus import DataError
    from mpifed.federation.reduce import FederationError
    from mpifed.model import ModelError

    return CheckpointError, FederationError, DataError, ModelError, NetworkError


def _say(line: str) -> None:
    print(f"mpifed: {line}", flush=True)


def join_world(comm: MPI.Intracomm, cfg: RunConfig, name: str, port: str = "", resume: str = ""
               ) -> tuple[MPI.Intracomm, RunConfig, int]:
    """One facility's own launch joins the others: the hub (the first facility listed) admits them, the
    others connect to it. Returns the merged world, the configuration of the facilities that joined
    (each keeping its data partition), and this facility's index in it. Raises JoinError."""
    from mpifed import configfile
    from mpifed.comm import join
    from mpifed.comm.watchdog import deadline
    from mpifed.data.corpus import shape
    from mpifed.model import planned_layout

    fed = cfg.federation
    names = [f.name for f in cfg.facility]
    if name not in names:
        raise join.LaunchError(f"--facility {name}: not in the configuration (facilities: {', '.join(names)})")
    ranks = cfg.facility[names.index(name)].ranks
    if comm.size != ranks:
        raise join.LaunchError(f"--facility {name}: this launch has {comm.size} ranks, the configuration gives "
                             f"{name} {ranks}; launch exactly {ranks}")
    try:
        _refuse_to_mix_runs(comm, cfg, resume)
    except ValueError as exc:
        raise join.LaunchError(str(exc)) from None
    token = join.read_token(fed.token_file)
    me = join.Hello(name, comm.size, planned_layout(cfg, *shape(cfg.data)).fingerprint, configfile.digest(cfg))
    say = _say if comm.rank == 0 else (lambda line: None)
    # The join bounds its own waits (the hub's wake-up call, the handshake's); this deadline catches a
    # peer that stops answering. A facility that is in waits as long as the hub still admits others.
    slack = join.HANDSHAKE_S + fed.timeout_s
    with deadline(comm, fed.join_timeout_s + slack, "join: waiting for the other facilities",
                  setting="federation.join_timeout_s") as watch:
        if name == names[0]:
            world, joined = join.serve(comm, me, token, {f.name: f.ranks for f in cfg.facility}, fed.rendezvous,
                                       fed.join_timeout_s, fed.min_facilities, say)
        else:
            address = join.find_hub(comm, fed.rendezvous, port, fed.join_timeout_s, say)
            world, hub_waits_s = join.connect(comm, address, me, token)
            say(f"facility {name} is in; the hub admits the others for up to {hub_waits_s:.0f} s more")
            watch.restart(hub_waits_s + slack, f"join: in, waiting with the hub {names[0]} for the others")
            world, joined = join.follow(world)
            say(f"facility {name} joined the federation")
    run_cfg = _keeping(cfg, joined)
    return world, run_cfg, [f.name for f in run_cfg.facility].index(name)


def main_joined(cfg: RunConfig, name: str, port: str = "", resume: str = "") -> int:
    """`mpifed run CONFIG --facility NAME`: join the other facilities' launches, then train as one."""
    from mpifed.comm.join import JoinError, LaunchError

    comm = MPI.COMM_WORLD
    stop.install()
    expected = (*_expected_errors(), JoinError)
    with abort_on_error(comm, expected=expected):
        try:
            world, run_cfg, index = join_world(comm, cfg, name, port, resume)
        except LaunchError as exc:  # the same on every rank: say it once, exit cleanly
            if comm.rank == 0:
                print(f"mpifed run: error: {exc}", file=sys.stderr, flush=True)
            return 2
    return _train(run_cfg, world, index, resume, elastic=True)
