"""The codecs' fused C kernels (kernels.c): built once per machine type with the system's C compiler,
cached, and loaded through ctypes. Each kernel makes one pass over a block where the torch path makes
8 to 12, and computes the same bytes (compress.py uses whichever is there; tests hold them equal).

The build goes to `cache_dir()/kernels/KEY.so`, KEY a digest of the source, the compiler and the CPU's
feature flags, so nodes of another CPU type sharing a HOME build their own. Ranks of a node that build
at once each write their own file and rename it into place. Without a C compiler (or with
MPIFED_KERNELS=0) the codecs run on the torch path, slower, with the same results.
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from functools import lru_cache
from pathlib import Path

import numpy as np

from mpifed import cache_dir
from mpifed.logs import LOG

SOURCE = Path(__file__).with_name("kernels.c")
ENABLE = "MPIFED_KERNELS"
"""Set to 0 to keep the codecs on the torch path."""
_FLAGS = ["-O3", "-fPIC", "-shared", "-ffp-contract=off", "-fno-fast-math", "-std=c11"]

_f32 = ctypes.POINTER(ctypes.c_float)
_u8 = ctypes.POINTER(ctypes.c_uint8)
_i64, _int, _float = ctypes.c_int64, ctypes.c_int, ctypes.c_float
_SIGNATURES = {
    "mpifed_encode_uniform": [_f32, _f32, _f32, _u8, _i64, _i64, _int, _float],
    "mpifed_decode_uniform": [_u8, _f32, _i64, _i64, _int, _int],
    "mpifed_encode_topk": [_f32, _f32, _f32, _u8, _i64, _int, _i64],
    "mpifed_decode_topk": [_u8, _f32, _i64, _int, _i64, _int],
    "mpifed_encode_bf16": [_f32, _f32, _f32, _u8, _i64],
    "mpifed_decode_bf16": [_u8, _f32, _i64, _int],
}


def _cpu_flags() -> str:
    """What the compiler's -march=native sees: the CPU's feature flags (or the machine name)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.machine()


def _build(compiler: str, target: Path) -> None:
    """Compile kernels.c into `target`, with -march=native where the compiler takes it."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, scratch = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        for native in (["-march=native"], []):
            done = subprocess.run([compiler, *_FLAGS, *native, str(SOURCE), "-o", scratch],
                                  capture_output=True, timeout=120)
            if done.returncode == 0:
                os.replace(scratch, target)
                return
        said = done.stderr.decode(errors="replace").strip().splitlines()
        raise OSError(said[-1] if said else f"exit {done.returncode}, no output")
    finally:
        if os.path.exists(scratch):
            os.unlink(scratch)


@lru_cache(maxsize=None)
def library() -> ctypes.CDLL | None:
    """The loaded kernels, built first if this machine type has no build yet; None where they cannot
    be (no compiler, a failed build, MPIFED_KERNELS=0): the codecs then run on the torch path."""
    if os.environ.get(ENABLE, "1") == "0":
        return None
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if not compiler:
        return _without("no C compiler (cc, gcc or $CC) on this node")
    key = hashlib.sha256("\n".join([SOURCE.read_text(), compiler, " ".join(_FLAGS), _cpu_flags()]).encode())
    target = cache_dir() / "kernels" / f"{key.hexdigest()[:16]}.so"
    try:
        if not target.exists():
            _build(compiler, target)
        lib = ctypes.CDLL(str(target))
    except (OSError, subprocess.SubprocessError) as exc:
        return _without(f"{compiler}: {exc}")
    for name, args in _SIGNATURES.items():
        getattr(lib, name).argtypes = args
        getattr(lib, name).restype = None
    return lib


def _without(why: str) -> None:
    """Say once, on this process, that the codecs run on the torch path, and why."""
    LOG.warning(f"the codecs' C kernels could not be built ({why}); they run on the slower torch path "
                f"(set {ENABLE}=0 to choose that)")
    return None


def f32(array: np.ndarray | None) -> "ctypes._Pointer | None":
    """A float* to a C-contiguous fp32 array (NULL for None)."""
    return None if array is None else array.ctypes.data_as(_f32)


def u8(array: np.ndarray) -> "ctypes._Pointer":
    """A uint8_t* to a C-contiguous uint8 array."""
    return array.ctypes.data_as(_u8)
