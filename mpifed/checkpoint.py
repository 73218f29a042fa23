"""HDF5 checkpoints of the global model: one file per checkpointed round, written atomically.

Layout (readable with plain h5py, h5ls and h5dump): root attributes `format_version`, `mpifed_version`,
`round`, `tokens` (seen so far, all facilities), `model_config` (JSON), `layout_fingerprint`,
`facilities` (JSON); one dataset `/model/<parameter name>` per parameter, in its own shape, fp32.
A file is written to a temporary name, fsynced and renamed; the `latest` pointer is replaced only after.
No pickle anywhere.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from mpifed import __version__
from mpifed.engines.base import FlatLayout

FORMAT_VERSION = 1
LATEST = "latest"


def file_name(round_: int) -> str:
    return f"round_{round_:05d}.h5"


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _replace_durably(tmp: Path, final: Path) -> None:
    with open(tmp, "rb+") as fh:
        os.fsync(fh.fileno())
    os.replace(tmp, final)
    _fsync_dir(final.parent)


def write(directory: str | Path, round_: int, tokens: int, layout: FlatLayout, flat: np.ndarray,
          model_config: str, facilities: list[dict[str, Any]]) -> Path:
    """Write the global model `flat` as round `round_`'s checkpoint and point `latest` at it."""
    directory = Path(directory)
    final = directory / file_name(round_)
    tmp = directory / f".{final.name}.tmp"
    with h5py.File(tmp, "w") as h5:
        h5.attrs.update(format_version=FORMAT_VERSION, mpifed_version=__version__, round=round_, tokens=tokens,
                        model_config=model_config, layout_fingerprint=layout.fingerprint,
                        facilities=json.dumps(facilities))
        group = h5.create_group("model")
        for name, values in layout.unflatten(flat).items():
            group.create_dataset(name, data=values)
    _replace_durably(tmp, final)
    pointer = directory / f".{LATEST}.tmp"
    pointer.write_text(final.name + "\n")
    _replace_durably(pointer, directory / LATEST)
    return final


def read(path: str | Path) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """(root attributes, parameter name -> array) of one checkpoint file."""
    with h5py.File(path, "r") as h5:
        attrs = {k: (v.item() if isinstance(v, np.generic) else v) for k, v in h5.attrs.items()}
        params = {name: ds[()] for name, ds in h5["model"].items()}
    return attrs, params


def files(directory: str | Path) -> list[Path]:
    """Checkpoint files of `directory`, oldest round first."""
    return sorted(Path(directory).glob("round_*.h5"))


def prune(directory: str | Path, keep: int) -> None:
    """Delete all but the newest `keep` checkpoints (keep = 0 keeps all)."""
    if keep > 0:
        for old in files(directory)[:-keep]:
            old.unlink()
