"""Site profiles: what differs between facilities lives in one TOML file per site (`sitecfg/NAME.toml`),
validated on load: the scheduler's options, the accelerator and torch backend, the MPI to use and how to
launch it, the modules to load, the environment (every variable with its reason), and the container.

Profiles are found in $MPIFED_SITECFG (a folder), then in the `sitecfg/` folder of a source checkout,
then in the installed share/mpifed/sitecfg. `mpifed sites list|show` prints them; `mpifed config new`
writes batch scripts from them.
"""
from __future__ import annotations

import os
import re
import sys
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from mpifed.config import NAME_RULE, choices, is_name
from mpifed.configfile import table_fields

Accelerator = Literal["cuda", "rocm", "cpu"]
Backend = Literal["nccl", "gloo"]
Launcher = Literal["srun", "mpirun"]
Runtime = Literal["apptainer", "singularity", "none"]


class SiteError(ValueError):
    """A profile that cannot be used; the message names the file and the key."""


@dataclass(frozen=True)
class Scheduler:
    """[scheduler]: the SLURM options of a facility's batch job on this site."""

    partition: str = ""
    """SLURM partition (empty: the cluster's default)."""
    account: str = ""
    """Project to charge; profiles carry a placeholder such as <PROJECT> that the user replaces."""
    qos: str = ""
    """SLURM quality of service, where the site needs one."""
    gpus_per_node: int = 0
    cpus_per_node: int = 1
    ranks_per_node: int = 1
    """MPI ranks per node: one per GPU (per GCD on MI250X), or per socket on CPU nodes."""
    time: str = "01:00:00"
    stop_ahead_s: int = 600
    """SLURM sends SIGUSR1 this many seconds before the walltime: the round in progress must finish and be
    checkpointed within it (a round's time plus a checkpoint's; `mpifed plan` estimates both). 0: no signal."""
    extra: tuple[str, ...] = ()
    """Further #SBATCH options, verbatim (e.g. --exclusive)."""
    memory_gb: float = 0.0
    """Host memory of a node (0: unknown; `mpifed plan` then uses this machine's)."""
    gpu_memory_gb: float = 0.0
    """Memory of one GPU (one GCD on MI250X): what a rank's model state must fit in on GPU sites."""


@dataclass(frozen=True)
class Mpi:
    """[mpi]: which MPI the ranks use and how they are started."""

    launcher: Launcher = "srun"
    """srun (the scheduler starts the ranks) or mpirun (the MPI's own launcher inside the allocation)."""
    srun_mpi: str = "pmi2"
    """srun --mpi= plugin the MPI speaks (pmi2 for MPICH-family MPIs, pmix for Open MPI 5)."""
    libmpi: str = ""
    """Host MPI library for MPI4PY_LIBMPI (an MPICH-ABI library: Cray MPICH, Intel MPI, MPICH); empty:
    the embedded MPICH wheel."""
    srun_args: str = ""
    """Further srun options the site's documentation gives for binding (e.g. LUMI-G's CPU masks per
    GCD, Frontier's --gpu-bind=closest); batch scripts export them as SRUN_ARGS."""


@dataclass(frozen=True)
class EnvVar:
    """One variable of [env]: its value, and why the site needs it (printed beside it in batch scripts)."""

    value: str
    why: str


@dataclass(frozen=True)
class Container:
    """[container]: the runtime and image the ranks run in, and the host paths bound into it."""

    runtime: Runtime = "none"
    image: str = ""
    """Path of the .sif image on the site (a placeholder until you build or copy it there)."""
    binds: tuple[str, ...] = ()
    """Host paths bound into the container (scratch, the host MPI and its fabric libraries)."""


@dataclass(frozen=True)
class Site:
    """One site profile (sitecfg/NAME.toml), validated: everything that differs between facilities."""

    name: str
    description: str
    accelerator: Accelerator
    torch_backend: Backend
    scheduler: Scheduler = field(default_factory=Scheduler)
    mpi: Mpi = field(default_factory=Mpi)
    modules: tuple[str, ...] = ()
    env: dict[str, EnvVar] = field(default_factory=dict)
    container: Container = field(default_factory=Container)
    scratch: str = ""
    """The site's scratch folder as a job sees it (it may use the site's variables, e.g.
    `$CINECA_SCRATCH`): batch scripts export it as MPIFED_SCRATCH, and `config new` puts each site's
    checkpoints under it. Empty: not known (checkpoints go to the project folder)."""
    docs: tuple[str, ...] = ()
    """The pages of the site's user documentation this profile follows (modules, binds, binding, the
    collective library's network plugin): the written README lists them."""
    build_first: tuple[str, ...] = ()
    """Shell commands a user runs once on the site before the first job (software the profile loads
    that the site does not provide ready-made); the written README lists them."""
    path: Path = Path()

    def __post_init__(self) -> None:
        problems = []
        for key, value, alias in (("accelerator", self.accelerator, Accelerator),
                                  ("torch_backend", self.torch_backend, Backend),
                                  ("mpi.launcher", self.mpi.launcher, Launcher),
                                  ("container.runtime", self.container.runtime, Runtime)):
            if value not in choices(alias):
                problems.append(f"{key}: {value!r} is not one of {', '.join(choices(alias))}")
        if self.accelerator == "cpu" and self.torch_backend != "gloo":
            problems.append("torch_backend: a cpu site uses gloo")
        if self.accelerator != "cpu" and self.scheduler.gpus_per_node < 1:
            problems.append(f"scheduler.gpus_per_node: a {self.accelerator} site needs at least one")
        if self.scheduler.ranks_per_node < 1 or self.scheduler.cpus_per_node < self.scheduler.ranks_per_node:
            problems.append("scheduler.ranks_per_node: must be between 1 and cpus_per_node")
        if self.scheduler.stop_ahead_s < 0:
            problems.append("scheduler.stop_ahead_s: must be >= 0 (0: no warning signal before the walltime)")
        if self.container.runtime != "none" and not self.container.image:
            problems.append("container.image: a container runtime needs an image path")
        # Scheduler options and paths land on lines of a batch script: a line break there would start
        # a command. (Descriptions and reasons may span lines: scripts fold them into one comment line.)
        for where, part in (("scheduler", self.scheduler), ("mpi", self.mpi), ("container", self.container)):
            for key, value in vars(part).items():
                for text in value if isinstance(value, tuple) else (value,):
                    if isinstance(text, str) and ("\n" in text or "\r" in text):
                        problems.append(f"{where}.{key}: must be one line")
        problems += [f"{key}: {m!r} must be one line" for key in ("modules", "docs", "build_first")
                     for m in getattr(self, key) if "\n" in m or "\r" in m]
        if "\n" in self.scratch or "\r" in self.scratch:
            problems.append("scratch: must be one line")
        problems += [f"env.{name}: not a shell variable name (letters, digits, '_')" for name in self.env
                     if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name)]
        if problems:
            raise SiteError(f"{self.path}: {'; '.join(problems)}")

    @property
    def container_flag(self) -> str:
        """apptainer exec's GPU flag for this accelerator."""
        return {"cuda": "--nv", "rocm": "--rocm"}.get(self.accelerator, "")


def load(path: Path) -> Site:
    """Read and validate one profile; errors name the file and every bad key."""
    try:
        data = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise SiteError(f"{path}: cannot read it as TOML ({exc})") from None
    problems: list[str] = []
    kwargs = table_fields(Site, data, "", problems, skip=("env", "path"))
    problems += [f"{key}: missing" for key in ("name", "description", "accelerator", "torch_backend")
                 if key not in kwargs]
    if not is_name(path.stem):  # the name reaches batch scripts: a line break there starts a command
        problems.append(f"the file name: {path.stem!r} is not a valid profile name ({NAME_RULE}); rename the file")
    elif kwargs.get("name", path.stem) != path.stem:
        problems.append(f"name: {kwargs['name']!r} must match the file name {path.stem!r}")
    env = {}
    for var, spec in data.get("env", {}).items():
        if isinstance(spec, dict) and set(spec) == {"value", "why"} and all(isinstance(v, str) for v in spec.values()):
            env[var] = EnvVar(**spec)
        else:
            problems.append(f"env.{var}: give {{ value = \"...\", why = \"...\" }} (every variable says why)")
    if problems:
        raise SiteError(f"{path}: {'; '.join(problems)}")
    return Site(**kwargs, env=env, path=path)


def folders() -> list[Path]:
    """Where profiles are looked up, in order."""
    out = [Path(os.environ["MPIFED_SITECFG"])] if os.environ.get("MPIFED_SITECFG") else []
    return out + [Path(__file__).resolve().parents[2] / "sitecfg", Path(sys.prefix) / "share" / "mpifed" / "sitecfg"]


def available() -> dict[str, Path]:
    """Profile name -> file (the first folder that has it wins)."""
    found: dict[str, Path] = {}
    for folder in folders():
        for path in sorted(folder.glob("*.toml")) if folder.is_dir() else []:
            found.setdefault(path.stem, path)
    return found


def get(name: str) -> Site:
    profiles = available()
    if name not in profiles:
        raise SiteError(f"no site profile {name!r}; available: {', '.join(profiles) or 'none'} "
                        f"(looked in {', '.join(map(str, folders()))})")
    return load(profiles[name])
