"""Site profiles: what differs between facilities lives in one TOML file per site (`sitecfg/NAME.toml`),
validated on load: the scheduler's options, the accelerator and torch backend, the MPI to use and how to
launch it, the modules to load, the environment (every variable with its reason), and the container.

Profiles are found in $MPIFED_SITECFG (a folder), then in the `sitecfg/` folder of a source checkout,
then in the installed share/mpifed/sitecfg. `mpifed sites list|show` prints them; `mpifed config new`
writes batch scripts from them.
"""
from __future__ import annotations

import dataclasses
import os
import sys
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ACCELERATORS = ("cuda", "rocm", "cpu")
BACKENDS = ("nccl", "gloo")
LAUNCHERS = ("srun", "mpirun")
RUNTIMES = ("apptainer", "singularity", "none")


class SiteError(ValueError):
    """A profile that cannot be used; the message names the file and the key."""


@dataclass(frozen=True)
class Scheduler:
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
    extra: tuple[str, ...] = ()
    """Further #SBATCH options, verbatim (e.g. --exclusive)."""


@dataclass(frozen=True)
class Mpi:
    launcher: str = "srun"
    """srun (the scheduler starts the ranks) or mpirun (the MPI's own launcher inside the allocation)."""
    srun_mpi: str = "pmi2"
    """srun --mpi= plugin the MPI speaks (pmi2 for MPICH-family MPIs, pmix for Open MPI 5)."""
    libmpi: str = ""
    """Host MPI library for MPI4PY_LIBMPI (an MPICH-ABI library: Cray MPICH, Intel MPI, MPICH); empty:
    the embedded MPICH wheel."""


@dataclass(frozen=True)
class EnvVar:
    value: str
    why: str


@dataclass(frozen=True)
class Container:
    runtime: str = "none"
    image: str = ""
    """Path of the .sif image on the site (a placeholder until you build or copy it there)."""
    binds: tuple[str, ...] = ()
    """Host paths bound into the container (scratch, the host MPI and its fabric libraries)."""


@dataclass(frozen=True)
class Site:
    name: str
    description: str
    accelerator: str
    torch_backend: str
    scheduler: Scheduler = field(default_factory=Scheduler)
    mpi: Mpi = field(default_factory=Mpi)
    modules: tuple[str, ...] = ()
    env: dict[str, EnvVar] = field(default_factory=dict)
    container: Container = field(default_factory=Container)
    path: Path = Path()

    def __post_init__(self) -> None:
        problems = []
        for key, value, choices in (("accelerator", self.accelerator, ACCELERATORS),
                                    ("torch_backend", self.torch_backend, BACKENDS),
                                    ("mpi.launcher", self.mpi.launcher, LAUNCHERS),
                                    ("container.runtime", self.container.runtime, RUNTIMES)):
            if value not in choices:
                problems.append(f"{key}: {value!r} is not one of {', '.join(choices)}")
        if self.accelerator == "cpu" and self.torch_backend != "gloo":
            problems.append("torch_backend: a cpu site uses gloo")
        if self.accelerator != "cpu" and self.scheduler.gpus_per_node < 1:
            problems.append(f"scheduler.gpus_per_node: a {self.accelerator} site needs at least one")
        if self.scheduler.ranks_per_node < 1 or self.scheduler.cpus_per_node < self.scheduler.ranks_per_node:
            problems.append("scheduler.ranks_per_node: must be between 1 and cpus_per_node")
        if self.container.runtime != "none" and not self.container.image:
            problems.append("container.image: a container runtime needs an image path")
        if problems:
            raise SiteError(f"{self.path}: {'; '.join(problems)}")

    @property
    def container_flag(self) -> str:
        """apptainer exec's GPU flag for this accelerator."""
        return {"cuda": "--nv", "rocm": "--rocm"}.get(self.accelerator, "")


def _table(cls: type, data: Any, where: str, path: Path) -> Any:
    if not isinstance(data, dict):
        raise SiteError(f"{path}: {where}: expected a table")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        if key not in fields or key == "path":
            raise SiteError(f"{path}: {where}{key}: unknown key; valid keys: "
                            f"{', '.join(k for k in fields if k != 'path')}")
        default = fields[key].default
        expected = type(default) if default is not dataclasses.MISSING else str
        if expected is tuple:
            if not (isinstance(value, list) and all(isinstance(v, str) for v in value)):
                raise SiteError(f"{path}: {where}{key}: expected a list of strings")
            value = tuple(value)
        elif expected in (int, str) and (not isinstance(value, expected) or isinstance(value, bool)):
            raise SiteError(f"{path}: {where}{key}: expected {expected.__name__}, got {type(value).__name__}")
        kwargs[key] = value
    return kwargs


def load(path: Path) -> Site:
    """Read and validate one profile; errors name the file and the key."""
    try:
        data = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise SiteError(f"{path}: cannot read it as TOML ({exc})") from None
    top = {k: v for k, v in data.items() if k not in ("scheduler", "mpi", "env", "container")}
    kwargs = _table(Site, top, "", path)
    for key in ("name", "description", "accelerator", "torch_backend"):
        if key not in kwargs:
            raise SiteError(f"{path}: {key}: missing")
    if kwargs["name"] != path.stem:
        raise SiteError(f"{path}: name: {kwargs['name']!r} must match the file name {path.stem!r}")
    env = {}
    for var, spec in data.get("env", {}).items():
        if not (isinstance(spec, dict) and set(spec) == {"value", "why"} and all(isinstance(v, str) for v in spec.values())):
            raise SiteError(f"{path}: env.{var}: give {{ value = \"...\", why = \"...\" }} (every variable says why)")
        env[var] = EnvVar(**spec)
    return Site(**kwargs, env=env, path=path,
                scheduler=Scheduler(**_table(Scheduler, data.get("scheduler", {}), "scheduler.", path)),
                mpi=Mpi(**_table(Mpi, data.get("mpi", {}), "mpi.", path)),
                container=Container(**_table(Container, data.get("container", {}), "container.", path)))


def folders() -> list[Path]:
    """Where profiles are looked up, in order."""
    out = [Path(os.environ["MPIFED_SITECFG"])] if os.environ.get("MPIFED_SITECFG") else []
    return out + [Path(__file__).resolve().parent.parent / "sitecfg", Path(sys.prefix) / "share" / "mpifed" / "sitecfg"]


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
