"""The `mpifed` command: one table of subcommands that parse, validate and hand over.

  simulate   run a whole federation on this machine (starts mpiexec itself)
  run        the per-rank program, started by mpiexec/srun with a config file
  data       prepare text into a tokenized, partitioned dataset folder (data.path)
  ckpt       inspect, verify and export checkpoints
  sites      list and show the site profiles
  config     write a project for a federation across sites (config new)
  report     plot runs side by side: a self-contained HTML page and/or a PNG grid
  plan       the memory and traffic a configuration needs, per facility and rank, before an allocation
  token      write a fresh shared token for separate launches (mode 0600)

Every error a user can cause is printed as one line naming the option, key or file, with a non-zero
exit and no traceback; nothing is written before the whole configuration has been validated.
"""
from __future__ import annotations

import os
import sys

import click

from mpifed import __version__, logs
from mpifed.cli import ckpt, data, deploy, plan, report, token, train
from mpifed.cli.common import launch_rank

COMMANDS: dict[str, click.Command] = {
    "simulate": train.simulate,
    "run": train.run,
    "data": data.data,
    "ckpt": ckpt.ckpt,
    "sites": deploy.sites,
    "config": deploy.config_group,
    "report": report.report,
    "plan": plan.plan,
    "token": token.token,
}
"""Every subcommand, by the name a user types: the only place commands are registered."""


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="mpifed")
@click.option("--quiet", "-q", "loudness", flag_value="quiet",
              help="Only warnings and errors (every rank this command starts too).")
@click.option("--verbose", "-v", "loudness", flag_value="verbose",
              help="Also debug lines, each with its rank and facility in front.")
def cli(loudness: str | None) -> None:
    """Train one language model across several HPC facilities over MPI.

    Each facility trains locally; every H steps the facilities' roots average what they learned
    (weighted by tokens), apply an outer optimizer and checkpoint the global model to HDF5.
    """
    if loudness:  # through the environment: mpiexec and srun hand it to every rank they start
        os.environ[logs.ENV] = loudness
        logs.LOG.setLevel(logs.LEVELS[loudness])


for _name, _command in COMMANDS.items():
    cli.add_command(_command, _name)


def _one_line(text: str) -> str:
    """An error stays one line whatever a name or path in it holds: control characters escaped."""
    return "".join(c if c.isprintable() or c == " " else repr(c)[1:-1] for c in text)


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
        if where != "mpifed run" or launch_rank() == 0:  # every rank of a launch fails alike: one says why
            click.echo(f"{where}: error: {_one_line(exc.format_message())}", err=True)
        sys.exit(exc.exit_code)
    sys.exit(code if isinstance(code, int) else 0)
