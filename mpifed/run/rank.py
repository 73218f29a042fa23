"""The per-rank program that `mpifed run` executes under mpiexec/srun: the only code that touches
`MPI.COMM_WORLD`. Build topology -> train -> close; any failure on any rank aborts the job, and a
planned stop (mpifed/run/stop.py) exits with STOPPED_EXIT after checkpointing its round.

Two ways in: one launch holding every facility (`main`), or one launch per facility that join over
MPI ports (`main_joined`, with `--facility NAME`); facilities launched separately may also leave and
come back between rounds (`_train`). Either way the rank then ends through `end`."""
from __future__ import annotations

import ctypes
import dataclasses
import os
import sys
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Collection, NoReturn

from mpi4py import MPI

from mpifed import STOPPED_EXIT
from mpifed.comm import control, secret, topology, watchdog
from mpifed.comm.rollcall import RollCall
from mpifed.comm.watchdog import abort_on_error
from mpifed.config import RunConfig
from mpifed.logs import LOG
from mpifed.run import stop

if TYPE_CHECKING:
    from mpifed.comm.door import Door
    from mpifed.comm.rejoin import Waiting
    from mpifed.run.trainer import Trainer


def end(code: int) -> NoReturn:
    """End this rank with `code` once its work is durable: flush, finalize MPI, and leave through the C
    library's `exit`, without the interpreter's teardown.

    Not the interpreter's teardown: gloo's worker threads live as long as anything still refers to a
    process group (a device mesh, DeepSpeed's groups), and tearing them down in the interpreter's order
    now and then aborts a process after a run that succeeded ("terminate called without an active
    exception"). Not `os._exit` either: MPICH (and the MPIs built on it) tells its process manager that
    the rank is done in a C exit handler, after MPI_Finalize returns. Skipped, the manager sees the
    rank's connection close unannounced, takes it for a crash and SIGKILLs every rank still running:
    always under a launch wrapper that does not `exec`, now and then without one, and either way the
    launcher, and a batch script deciding whether to restart, reads a finished run as killed."""
    sys.stdout.flush()
    sys.stderr.flush()
    if MPI.Is_initialized() and not MPI.Is_finalized():
        MPI.Finalize()
    try:  # holding the GIL: some libraries' exit handlers call into Python
        libc = ctypes.PyDLL(None)
    except OSError:  # no C library to load by that name: the interpreter's own quick exit
        os._exit(code)
    libc.exit(code)
    os._exit(code)  # not reached


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


def _train(cfg: RunConfig, world: MPI.Intracomm, index: int, resume: str, token: bytes | None,
           joined: Joined | None = None) -> int:
    """Train every round (or up to a planned stop); the rank's exit code. With separate launches
    (`joined`), facilities may leave and come back between rounds; the topology is then rebuilt over the
    new world (`_without`, `_with_newcomer`) and training goes on."""
    from mpifed.run.trainer import Trainer  # heavy imports (torch, transformers) only once MPI is up

    trainer, entering, newcomer = None, None, None
    door = joined.door if joined else None
    back: tuple[str, float] | None = None  # the facility admitted at the last boundary, and when it began
    if joined is not None and joined.come_back is not None:  # coming back: build alone, train ahead, enter
        from mpifed.comm.join import JoinError

        with abort_on_error(world, expected=(*_expected_errors(), JoinError)):
            topo = topology.build(world, index, [f.name for f in cfg.facility], cfg.federation.roots, token)
            trainer = Trainer(cfg, topo, elastic=True, returning=True)
            watchdog.set_phase("join: back, waiting for the next round boundary")
            world, entering = newcomer = trainer.train_ahead(joined.come_back())
            if topo.is_leader:
                _say(f"facility {topo.facility_name} rejoined the federation after round {entering['round']}")
            trainer.release()
            topo.close()
            cfg = _keeping(joined.full, entering["joined"])
            index = [f.name for f in cfg.facility].index(topo.facility_name)
    while True:
        with abort_on_error(world, expected=_expected_errors()):
            topo = topology.build(world, index, [f.name for f in cfg.facility], cfg.federation.roots, token)
            roll = RollCall(topo.world, topo.facility_offsets, topo.facility_names)
            watchdog.install(roll)  # from here a failure names the facility that was lost
            if trainer is None:
                trainer = Trainer(cfg, topo, resume, elastic=joined is not None)
            else:
                trainer.regroup(cfg, topo, entering=entering is not None, newcomer=newcomer and newcomer[1])
                newcomer = None
            if back is not None and topo.is_global_root:
                _say(f"facility {back[0]} rejoined after round {trainer.round}; the round boundary took "
                     f"{time.monotonic() - back[1]:.2f} s")
            trainer.door, back = door, None
            trainer.run()
            watchdog.install(None)
            roll.close()
            if not trainer.leaving and not trainer.admitting:
                break
            trainer.release()
            topo.close()
            me, began = topo.facility_name, time.monotonic()
            if trainer.leaving:
                world = _without(world, topo, trainer.leaving, door)
                if world is None:
                    trainer.close()
                    return STOPPED_EXIT
                cfg, entering = _keeping(cfg, [n for n in topo.facility_names if n not in trainer.leaving]), None
            else:
                world, entering = _with_newcomer(world, topo, trainer, joined)
                back = (next(n for n in entering["joined"] if n not in topo.facility_names), began)
                cfg = _keeping(joined.full, entering["joined"])
            index = [f.name for f in cfg.facility].index(me)
    if door is not None:
        door.close()
    trainer.close()
    topo.close()
    return 0 if trainer.stopped_after is None else STOPPED_EXIT


def _without(world: MPI.Intracomm, topo: topology.Topology, leaving: tuple[str, ...],
             door: "Door | None") -> MPI.Intracomm | None:
    """After the round that `leaving` asked to stop at: split the world into those who stay, then
    disconnect it, collectively with the leavers (the last thing they do with the others: nothing
    waits on them again). The world of those who stay; None on a leaver."""
    stays = topo.facility_name not in leaving
    rest = world.Split(0 if stays else MPI.UNDEFINED, key=world.rank)
    world.Disconnect()
    if door is not None:
        door.forget(leaving)
    return rest if stays else None


def _with_newcomer(world: MPI.Intracomm, topo: topology.Topology, trainer: "Trainer", joined: Joined
                   ) -> tuple[MPI.Intracomm, dict]:
    """At the round boundary where a facility comes back: the world with it merged in, and what every
    rank now knows (see mpifed/comm/rejoin.py)."""
    from mpifed.comm import rejoin

    merged, told = rejoin.admit(world, joined.door, [f.name for f in joined.full.facility],
                                topo.facility_names, {"round": trainer.round, "tokens": trainer.parts.tokens_total})
    if world is not MPI.COMM_WORLD:  # a hub that was alone works on its launch's own world
        world.Free()
    return merged, told


def _keeping(cfg: RunConfig, names: Collection[str]) -> RunConfig:
    """The configuration of only the facilities `names` (those that joined, or those in after others
    left or came back), each keeping its data partition: of data.path, or of the embedded text cut
    into as many partitions as `cfg` lists facilities. `cfg` itself when it lists no others."""
    present = [dataclasses.replace(f, partition=cfg.partition_of(i)) for i, f in enumerate(cfg.facility)
               if f.name in names]
    if len(present) == len(cfg.facility):
        return cfg
    data = cfg.data if cfg.data.path or cfg.data.partitions else dataclasses.replace(cfg.data,
                                                                                     partitions=len(cfg.facility))
    return dataclasses.replace(cfg, facility=present, data=data)


def _alone(cfg: RunConfig, name: str) -> RunConfig:
    """What a facility coming back builds with, over its own job alone: `_keeping` it, with the
    federation's settings about the other facilities (how many must stay, how many a round draws)
    left out. Only until it is in: its regroup replaces them (the federation's too)."""
    fed = dataclasses.replace(cfg.federation, min_facilities=0, sample=1.0, min_participants=1)
    return _keeping(dataclasses.replace(cfg, federation=fed), [name])


def main(cfg: RunConfig, resume: str = "") -> int:
    """`mpifed run CONFIG`: every facility in this one launch (MPMD program number, or listing order)."""
    comm = MPI.COMM_WORLD
    stop.install()
    try:
        appnum = comm.Get_attr(MPI.APPNUM)
        indices = topology.facility_of_ranks([f.ranks for f in cfg.facility],
                                             control.allgather_int(comm, appnum or 0))
        _refuse_to_mix_runs(comm, cfg, resume)
        token = secret.given_token(cfg.federation.token_file)
    except ValueError as exc:  # the same on every rank: say it once, exit cleanly
        if comm.rank == 0:
            LOG.error(f"mpifed run: error: {exc}")
        return 2
    return _train(cfg, comm, indices[comm.rank], resume, token)


def _expected_errors() -> tuple[type[BaseException], ...]:
    """Failures that are a situation, not a bug: printed as their message alone."""
    from mpifed.checkpoint.format import CheckpointError
    from mpifed.comm.link import LinkError
    from mpifed.comm.topology import NetworkError
    from mpifed.data.corpus import DataError
    from mpifed.federation.reduce import FederationError
    from mpifed.model import ModelError

    return CheckpointError, FederationError, DataError, ModelError, NetworkError, LinkError


def _say(line: str) -> None:
    LOG.info(line)


@dataclass
class Joined:
    """One facility's launch once it is in the federation (see `join_world`)."""

    world: MPI.Intracomm
    """Every rank of the facilities in."""
    cfg: RunConfig
    """The configuration of the facilities in, each keeping its data partition."""
    index: int
    """This facility's index in `cfg`."""
    full: RunConfig
    """The configuration as given: every facility that may be in."""
    door: "Door | None" = None
    """On the hub's leader, where facilities may leave (federation.min_facilities >= 1): its door, still
    open, admits those that come back (mpifed/comm/door.py, rejoin.py)."""
    token: bytes = dataclasses.field(default=b"", repr=False)
    """The federation's shared secret (never printed): the roots' links are sealed under it."""
    come_back: "Callable[[], Waiting] | None" = None
    """A facility coming back to a running federation, which the door would admit: once it is built
    (over `world`, its own job alone), this tells the door where it waits for the next round
    boundary (see mpifed/comm/rejoin.py)."""


def join_world(comm: MPI.Intracomm, cfg: RunConfig, name: str, port: str = "", resume: str = "") -> Joined:
    """One facility's own launch joins the others: the hub (the first facility listed) admits them, the
    others connect to it; a facility that finds the federation running already enters it at the next
    round boundary. Raises JoinError."""
    from mpifed import configfile
    from mpifed.comm import join, rejoin
    from mpifed.comm.door import Hello, bounded
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
    me = Hello(name, comm.size, planned_layout(cfg, *shape(cfg.data)).fingerprint, configfile.digest(cfg),
               bounded(configfile.settings(cfg)), join.mpi_library())
    say = _say if comm.rank == 0 else (lambda line: None)
    # The join bounds its own waits (the hub's wake-up call, the handshake's); this deadline catches a
    # peer that stops answering. A facility that is in waits as long as the hub still admits others.
    slack = join.HANDSHAKE_S + fed.timeout_s
    with deadline(comm, fed.join_timeout_s + slack, "join: waiting for the other facilities",
                  setting="federation.join_timeout_s") as watch:
        expected = {f.name: f.ranks for f in cfg.facility}
        door, come_back = None, None
        if name == names[0]:
            world, joined, door = join.serve(comm, me, token, expected, fed.rendezvous, fed.join_timeout_s,
                                                fed.min_facilities, say)
        else:
            address = join.find_hub(comm, fed.rendezvous, port, fed.join_timeout_s, say)
            admitted = join.connect(comm, address, me, token)
            if admitted.running:
                say(f"facility {name} is back in the running federation; it joins at the next round boundary")
                watch.stop()  # it waits in an accept as long as the hub admits (see rejoin.Waiting)
                rejoin.later(comm, admitted)  # it builds first, over its own ranks, then comes back

                def come_back() -> "Waiting":
                    again = join.connect(comm, address, me, token)
                    return rejoin.Waiting(comm, again, token, fed.rendezvous, fed.join_timeout_s, say)
                world, joined = comm, [name]
            else:
                say(f"facility {name} is in; the hub admits the others for up to {admitted.remaining_s:.0f} s more")
                watch.restart(admitted.remaining_s + slack, f"join: in, waiting with the hub {names[0]} for the others")
                world, joined = join.follow(admitted.merge())
                say(f"facility {name} joined the federation")
    run_cfg = _keeping(cfg, joined) if come_back is None else _alone(cfg, name)
    return Joined(world, run_cfg, [f.name for f in run_cfg.facility].index(name), cfg, door, token, come_back)


def main_joined(cfg: RunConfig, name: str, port: str = "", resume: str = "") -> int:
    """`mpifed run CONFIG --facility NAME`: join the other facilities' launches, then train as one."""
    from mpifed.comm.join import JoinError, LaunchError

    comm = MPI.COMM_WORLD
    stop.install()
    expected = (*_expected_errors(), JoinError)
    with abort_on_error(comm, expected=expected):
        try:
            joined = join_world(comm, cfg, name, port, resume)
        except LaunchError as exc:  # the same on every rank: say it once, exit cleanly
            if comm.rank == 0:
                LOG.error(f"mpifed run: error: {exc}")
            return 2
    return _train(joined.cfg, joined.world, joined.index, resume, joined.token, joined)
