"""`mpifed sites` (list and show the site profiles in sitecfg/) and `mpifed config new` (write a project:
mpifed.toml, one batch script per facility, the launch wrappers and a README of the steps)."""
from __future__ import annotations

from pathlib import Path

import click

from mpifed import configfile
from mpifed.cli.common import UserError, check_writable, default_of, load_config, set_option
from mpifed.config import Compression, EngineName, FacilityConfig, OuterName, Preset, choices
from mpifed.deploy import project
from mpifed.deploy.defaults import LONG_RUN_ROUNDS, Proposal, outer_for, outer_proposals, proposals
from mpifed.deploy.sites import Site, SiteError, available, get


@click.group()
def sites() -> None:
    """Site profiles (sitecfg/*.toml): scheduler, accelerator, MPI, modules, environment, container."""


def _site(name: str) -> Site:
    try:
        return get(name)
    except SiteError as exc:
        raise UserError(str(exc)) from None


@sites.command("list")
def sites_list() -> int:
    """Every profile, one line each (a malformed one is an error naming its file and key)."""
    for name in available():
        site = _site(name)
        click.echo(f"{name:<14} {site.accelerator:<5} {site.mpi.launcher:<7} {site.description}")
    return 0


@sites.command("show")
@click.argument("name")
def sites_show(name: str) -> int:
    """One profile in full, with the reason for every environment variable."""
    site = _site(name)
    s, m, c = site.scheduler, site.mpi, site.container
    click.echo(f"{site.name}: {site.description}\n  file         {site.path}")
    click.echo(f"  accelerator  {site.accelerator} (torch backend {site.torch_backend})")
    click.echo(f"  scheduler    partition {s.partition or '(default)'}, account {s.account or '-'}"
               f"{', qos ' + s.qos if s.qos else ''}, {s.gpus_per_node} GPUs and {s.cpus_per_node} CPUs per node, "
               f"{s.ranks_per_node} ranks per node, time {s.time}"
               f"{f' (SIGUSR1 {s.stop_ahead_s} s before it)' if s.stop_ahead_s else ''}"
               f"{' ' + ' '.join(s.extra) if s.extra else ''}")
    click.echo(f"  mpi          {m.launcher} (srun --mpi={m.srun_mpi}), "
               f"{'MPI4PY_LIBMPI=' + m.libmpi if m.libmpi else 'the embedded MPICH'}")
    click.echo(f"  modules      {' '.join(site.modules) or '-'}")
    click.echo(f"  container    {c.runtime}{' ' + c.image if c.image else ''}"
               f"{' (binds ' + ','.join(c.binds) + ')' if c.binds else ''}")
    for var, spec in site.env.items():
        click.echo(f"  env {var}={spec.value}\n      {spec.why}")
    return 0


@click.group("config")
def config_group() -> None:
    """Create run configurations and projects."""


def _facilities(value: str) -> list[tuple[str, str, int, str]]:
    """--facilities NAME:SITE:RANKS[:ENGINE],... parsed (a callback would see prompted answers twice)."""
    out = []
    for item in filter(None, (v.strip() for v in value.split(","))):
        parts = item.split(":")
        if len(parts) not in (3, 4) or not parts[2].isdigit():
            raise UserError(f"--facilities: {item!r}: expected NAME:SITE:RANKS or NAME:SITE:RANKS:ENGINE")
        out.append((parts[0], parts[1], int(parts[2]), parts[3] if len(parts) == 4 else default_of(FacilityConfig, "engine")))
    if not out:
        raise UserError("--facilities: name at least one facility")
    return out


@config_group.command("new")
@click.argument("out", type=click.Path(file_okay=False, path_type=Path))
@click.option("--facilities", prompt="Facilities (NAME:SITE:RANKS[:ENGINE], comma-separated; "
              "the first is the hub)", default="leonardo:leonardo:4:fsdp,lumi:lumi:8:deepspeed",
              help=f"NAME:SITE:RANKS[:ENGINE],... (engine: {', '.join(choices(EngineName))}; default "
                   f"{default_of(FacilityConfig, 'engine')}; the first facility is the hub).")
@click.option("--model", prompt="Model (a preset or a local model folder)", default="llama-small",
              help=f"A preset ({', '.join(choices(Preset))}) or a model folder.")
@click.option("--data", "data_path", prompt="Prepared data folder (empty: the embedded text)", default="",
              help="A folder from `mpifed data prepare` (data.path); empty: the embedded text.")
@click.option("--rounds", type=click.IntRange(min=1), prompt="Rounds", default=10, help="federation.rounds")
@click.option("--local-steps", type=click.IntRange(min=1), prompt="Local steps per round (H)", default=50,
              help="train.local_steps")
@click.option("--outer", type=click.Choice(choices(OuterName)),
              prompt="Outer optimizer", default=lambda: outer_for(click.get_current_context().params.get("rounds", 0)),
              help=f"federation.outer (default: diloco, with an outer warm-up, from {LONG_RUN_ROUNDS} rounds; fedavg "
                   "for shorter runs, as benchmarks/parity.py measured; see the README)")
@click.option("--compress", type=click.Choice(choices(Compression)), prompt="Compression between facilities",
              default="int8", help="federation.compress (int8: a quarter of fp32's bytes, no measurable loss "
                                   "in benchmarks/parity.py)")
@click.option("--rendezvous", prompt="Rendezvous file every site sees (empty: pass the hub's port by hand)",
              default="hub-port.txt", help="federation.rendezvous")
@click.option("--token-file", prompt="Token file (empty: MPIFED_TOKEN from the environment)", default="",
              help="federation.token_file (mode 0600)")
@click.option("--checkpoint-dir", prompt="Checkpoint folder (empty: each site's scratch where every profile names one)",
              default="", help="checkpoint.dir; empty: $MPIFED_SCRATCH/mpifed/OUT's name where every site's "
                               f"profile names its scratch, else {project.SCRATCHLESS_DIR!r} in the project folder")
@click.option("--max-restarts", type=click.IntRange(min=0), default=default_of(project.Project, "max_restarts"),
              show_default=True,
              help="How many times in a row a facility's job that did not finish the run is started again "
                   "(resuming from the newest checkpoint).")
@set_option
@click.option("--overwrite", is_flag=True, help="Replace the files of an existing project in OUT.")
def config_new(out: Path, facilities: str, model: str, data_path: str, rounds: int, local_steps: int, outer: str,
               compress: str, rendezvous: str, token_file: str, checkpoint_dir: str, max_restarts: int,
               sets: tuple[str, ...], overwrite: bool) -> int:
    """Write a project to OUT: mpifed.toml, one SLURM script per facility (srun + the container-wrapped
    `mpifed run --facility`), the launch/ wrappers and a README of the steps.

    Every prompt has a flag, so it also runs without a terminal:

    \b
    mpifed config new proj --facilities a:local:1,b:local:1 --model llama-tiny --data '' --rounds 2 \\
        --local-steps 5 --outer diloco --compress none --rendezvous hub-port.txt --token-file '' \\
        --checkpoint-dir checkpoints
    """
    listed = _facilities(facilities)
    if (out / "mpifed.toml").exists() and not overwrite:
        raise UserError(f"OUT: {out} already holds a project (mpifed.toml); choose another folder or pass --overwrite")
    check_writable(out, "OUT", is_dir=True)
    try:
        profiles = {name: get(site) for name, site, _, _ in listed}
    except SiteError as exc:
        raise UserError(f"--facilities: {exc}") from None
    if not checkpoint_dir:  # each site's own scratch (the batch scripts export it), not the project's home
        on_scratch = all(site.scratch for site in profiles.values())
        checkpoint_dir = f"$MPIFED_SCRATCH/mpifed/{out.resolve().name}" if on_scratch else project.SCRATCHLESS_DIR
    is_folder = "/" in model or Path(model).is_dir()
    data = {
        "model": {"path": model} if is_folder else {"preset": model},
        "data": {"path": data_path} if data_path else {},
        "train": {"local_steps": local_steps},
        "federation": {"rounds": rounds, "outer": outer, "compress": compress, "rendezvous": rendezvous,
                       "token_file": token_file},
        "checkpoint": {"dir": checkpoint_dir},
        "facility": [{"name": n, "site": s, "ranks": r, "engine": e} for n, s, r, e in listed],
    }
    proposed = _proposals(data, sets, profiles)
    given = {item.split("=", 1)[0].strip() for item in sets}
    sets = tuple(f"{p.key}={p.value}" for p in proposed if p.key not in given) + sets  # the user's come last
    cfg = load_config(data, sets, here=False)  # the paths and packages are the sites', checked there
    chosen = tuple((p, configfile.setting(cfg, p.key)) for p in proposed)
    written = project.write(out, project.Project(cfg, profiles, max_restarts, chosen))
    click.echo(f"wrote {len(written)} files to {out}: mpifed.toml, "
               f"{', '.join(f.name + '.sbatch' for f in cfg.facility)}, launch/, README.md; next: {out}/README.md")
    return 0


def _proposals(data: dict, sets: tuple[str, ...], profiles: dict[str, Site]) -> list[Proposal]:
    """The settings proposed for the outer optimizer and the size of the model (mpifed/deploy/defaults.py);
    none for the size where the model cannot be sized here (a model folder of another machine), none at
    all where the configuration does not validate (load_config then says why)."""
    from mpifed.config import ConfigError
    from mpifed.data.corpus import VOCAB_SIZE, DataError, shape
    from mpifed.model import ModelError, planned_layout

    try:
        cfg = configfile.from_dict(configfile.apply_sets(data, list(sets)))
    except ConfigError:
        return []
    try:
        seq_len, vocab = shape(cfg.data)
    except DataError:  # data prepared at the site: its vocabulary barely moves the count
        seq_len, vocab = cfg.data.seq_len, VOCAB_SIZE
    try:
        params = planned_layout(cfg, seq_len, vocab).numel
    except (ModelError, OSError, ValueError):
        click.echo(f"note: model.path {cfg.model.path} is not on this machine: no settings proposed for its size")
        return outer_proposals(cfg.federation.rounds, cfg.federation.outer)
    roots = min(min(f.ranks, profiles[f.name].scheduler.ranks_per_node) for f in cfg.facility)
    return outer_proposals(cfg.federation.rounds, cfg.federation.outer) + proposals(
        params, cfg.federation.rounds, all(s.accelerator != "cpu" for s in profiles.values()), roots, not cfg.data.path)

