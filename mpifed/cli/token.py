"""`mpifed token FILE`: a fresh shared token for facilities launched separately, written readable only by
its owner. The token is never printed: it goes from this file to each site's copy (scp -p keeps the
mode), where `federation.token_file` names it."""
from __future__ import annotations

import os
from pathlib import Path

import click

from mpifed.cli.common import UserError
from mpifed.comm.secret import new_token


@click.command("token")
@click.argument("file", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--force", is_flag=True, help="Replace FILE if it exists (to rotate the token).")
def token(file: Path, force: bool) -> None:
    """Write a fresh 256-bit token to FILE with mode 0600.

    Copy FILE to every site (`scp -p FILE login.site:.mpifed/token`) and set federation.token_file to its
    path there. To rotate: `mpifed token --force FILE`, copy it again, and start every site's next job
    with it (a facility holding the old token is refused at its handshake).
    """
    if file.exists() and not force:
        raise UserError(f"{file} exists; pass --force to replace it (rotating the token), or choose another file")
    if not file.parent.is_dir():
        raise UserError(f"{file}: the folder {file.parent} does not exist")
    tmp = file.with_name(f".{file.name}.{os.getpid()}.tmp")
    try:  # made 0600 from the start, never readable by others, then renamed over FILE whole
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as out:
            out.write(new_token() + "\n")
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, file)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise UserError(f"{file}: cannot write it ({exc.strerror or exc})") from None
    click.echo(f"mpifed token: wrote a fresh 256-bit token to {file} (mode 0600); copy it to every site with "
               "`scp -p` and set federation.token_file to it there")
