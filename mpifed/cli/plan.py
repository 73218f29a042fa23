"""`mpifed plan CONFIG`: the memory and traffic a run configuration needs, per facility and rank, worked
out without allocating the model (see mpifed/plan.py for the rules)."""
from __future__ import annotations

import shutil
from pathlib import Path

import click

from mpifed.cli.common import UserError, first_existing, load_config, read_config_file, set_option


@click.command()
@click.argument("config_file", type=click.Path(dir_okay=False, path_type=Path))
@set_option
@click.option("--bandwidth", default="10gbit", metavar="RATE", show_default=True,
              help="The link between sites, for the time a round's exchange takes (100mbit, 10gbit, ...).")
def plan(config_file: Path, sets: tuple[str, ...], bandwidth: str) -> int:
    """Per facility: the bytes a rank holds (weights, gradients, optimizer state, mpifed's buffers), its
    peak at start, in training, at a checkpoint and at a resume against what its site gives a rank, and
    what a round moves inside the facility and between sites. Run it before asking for an allocation."""
    cfg = load_config(read_config_file(config_file), sets)
    from mpifed import plan as planner  # torch and transformers, for the model's layout on the meta device
    from mpifed.data.corpus import shape
    from mpifed.model import planned_model

    try:
        rate = planner.parse_bandwidth(bandwidth)
    except ValueError as exc:
        raise UserError(f"--bandwidth {exc}") from None
    seq_len, vocab = shape(cfg.data)
    model, layout = planned_model(cfg, seq_len, vocab)
    config = model.config
    dims = (config.hidden_size, config.num_hidden_layers, config.vocab_size, seq_len)
    plans = [planner.plan_facility(cfg, i, layout, dims, rate) for i in range(len(cfg.facility))]
    advice = {i: planner.fixes(cfg, i, layout, dims) for i, p in enumerate(plans) if p.problems()}
    click.echo(planner.render(plans, bandwidth, advice))
    for problem in planner.disk_problems(cfg, plans, shutil.disk_usage(first_existing(Path(cfg.checkpoint.dir))).free):
        click.echo(f"warning: {problem}")
    return 0
