"""Verifying checkpoint files that may be damaged or crafted in a child process of their own.

HDF5 is C: a file with the right bytes flipped can crash it (a segmentation fault, measured: one in a
few hundred random flips of a segment file), and no Python handler catches that. Where a file comes
from outside this process (a resume's candidates, a facility's own part, `mpifed ckpt`), it is
verified here: `python -m mpifed.checkpoint.isolated` runs format.verify or format.check_part and
answers one line of JSON. A child that dies says only that the file is bad, in one line; the caller
(a rank, the command line) goes on to the next candidate or exits cleanly. Costs about 0.2 s of
start-up per file, against seconds to read the file itself.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from mpifed.checkpoint import format as checkpoint
from mpifed.checkpoint.files import CheckpointError
from mpifed.checkpoint.format import PartsCheck, VerifiedCheckpoint


def _ask(path: Path, request: dict) -> dict:
    """Run one request in a child; its answer, or CheckpointError with the one line that says why."""
    try:
        done = subprocess.run([sys.executable, "-m", "mpifed.checkpoint.isolated", json.dumps(request)],
                              capture_output=True, text=True, stdin=subprocess.DEVNULL)
    except OSError:  # no process to be had (a limit on processes): check it here, unprotected
        return _answer(request)
    if done.returncode < 0:
        raise CheckpointError(f"{path}: reading it crashed HDF5 (signal {-done.returncode}): a damaged or "
                              "crafted file")
    try:
        answer = json.loads(done.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        first = (done.stderr.strip().splitlines() or ["no output"])[-1][:300]
        raise CheckpointError(f"{path}: its verification failed ({first})") from None
    if "error" in answer:
        raise CheckpointError(answer["error"])
    return answer


def verify(path: str | Path, parts_dir: Path | None = None, check_data: bool = True,
           facilities: PartsCheck = "all") -> VerifiedCheckpoint:
    """format.verify, in a child process."""
    found = _ask(Path(path), {"verify": str(path), "parts_dir": str(parts_dir) if parts_dir else None,
                              "check_data": check_data, "facilities": facilities})
    return VerifiedCheckpoint(**{**found, "path": Path(found["path"]), "elsewhere": tuple(found["elsewhere"]),
                                 "layout": checkpoint.layout_from_json(found["layout"])})


def check_part(path: Path, digest: str = "", check_data: bool = True, numel: int = 0) -> int:
    """format.check_part, in a child process."""
    return int(_ask(path, {"check_part": str(path), "digest": digest, "check_data": check_data,
                           "numel": numel})["bytes"])


def _answer(request: dict) -> dict:
    """In the child: do what `request` asks; the result as JSON-able values."""
    if "check_part" in request:
        return {"bytes": checkpoint.check_part(Path(request["check_part"]), request["digest"], request["check_data"],
                                               request["numel"])}
    parts = Path(request["parts_dir"]) if request["parts_dir"] else None
    found = checkpoint.verify(request["verify"], parts, request["check_data"], request["facilities"])
    out = {**found.__dict__, "path": str(found.path), "elsewhere": list(found.elsewhere)}
    out["layout"] = checkpoint.layout_json(found.layout)
    return out


if __name__ == "__main__":
    try:
        reply = _answer(json.loads(sys.argv[1]))
    except CheckpointError as exc:
        reply = {"error": str(exc)}
    sys.stdout.write(json.dumps(reply) + "\n")  # the reply to the parent, not a log line
    sys.stdout.flush()
