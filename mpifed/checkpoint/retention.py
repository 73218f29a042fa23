"""Which checkpoint files a folder keeps: pruning to `checkpoint.keep` rounds (by round number, never
past the round just published), a main file that does not verify set aside, and the temporary files a
killed job left swept at the next start. What the files hold and how they are verified is
mpifed/checkpoint/format.py's.
"""
from __future__ import annotations

from pathlib import Path

from mpifed.checkpoint.format import facility_parts, main_files, part_round, round_of


def prune(directory: str | Path, keep: int, newest: int) -> None:
    """Delete all but the newest `keep` checkpoints up to round `newest`, the one just published, with
    their parts (keep = 0 keeps all). Files of later rounds (another run's, or a damaged one a resume
    could not use) are neither counted as newer nor deleted: counting them could delete every round
    that verifies and leave `latest` naming a deleted file."""
    if keep <= 0:
        return
    rounds = [r for r in (part_round(p) for p in main_files(directory)) if r <= newest]
    if len(rounds) > keep:
        _remove_before(directory, rounds[-keep])


def set_aside(path: Path) -> Path:
    """Rename a main file that does not verify out of every round's way (PATH.damaged, or .damaged-N
    when that is taken): it is never counted, pruned or offered again, and nothing of it is lost."""
    aside = path.with_name(path.name + ".damaged")
    n = 1
    while aside.exists():
        n += 1
        aside = path.with_name(f"{path.name}.damaged-{n}")
    path.rename(aside)
    return aside


def sweep_unpublished(directory: str | Path, facility: str) -> list[str]:
    """Remove the temporary files (`.round_N...h5.tmp`) an interrupted job left in `directory`: those of
    rounds up to the newest main file there, or, in a folder of parts alone, facility `facility`'s up to
    its newest part. A write in flight (another facility's, sharing the folder) is of a later round
    than any published, so it is never touched. Returns the names removed."""
    mains = [part_round(p) for p in main_files(directory)]
    newest = max(mains) if mains else max((part_round(p) for p in facility_parts(directory, facility)), default=0)
    removed = []
    for path in Path(directory).glob(".round_*.h5.tmp"):
        name = path.name[1:-4]
        found = round_of(name)
        mine = bool(mains) or name.endswith(f".fac-{facility}.h5")
        if found is not None and found <= newest and mine:
            path.unlink(missing_ok=True)
            removed.append(path.name)
    return sorted(removed)


def prune_parts(directory: str | Path, name: str, keep: int, newest: int) -> None:
    """At a site that holds only facility `name`'s parts: delete all but its newest `keep` parts up to
    round `newest`, the one just written (later ones are neither counted nor deleted)."""
    rounds = [r for r in (part_round(p) for p in facility_parts(directory, name)) if r <= newest]
    if keep > 0 and len(rounds) > keep:
        _remove_before(directory, rounds[-keep], name)


def _remove_before(directory: str | Path, round_: int, facility: str = "") -> None:
    """Delete the files of rounds before `round_` (only facility `facility`'s parts, when given). Another
    site's leader may prune the same shared folder at once: a file already gone is fine."""
    pattern = f"round_*.fac-{facility}.h5" if facility else "round_*.h5"
    for path in Path(directory).glob(pattern):
        if (found := round_of(path.name)) is not None and found < round_:
            path.unlink(missing_ok=True)
