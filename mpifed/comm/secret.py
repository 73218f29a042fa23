"""The shared token of a federation launched separately: where it is read from (MPIFED_TOKEN or
`federation.token_file`, mode 0600), whether it is strong enough (MIN_TOKEN_BITS), and making a fresh
one (`mpifed token FILE`). No MPI here: the command line imports it. The token is never printed."""
from __future__ import annotations

import math
import os
import secrets
import stat
from collections import Counter
from pathlib import Path

MIN_TOKEN_BITS = 128
"""A token with fewer bits than this is refused at start: a stranger who probes a port sees nothing
derived from it (the caller proves first), but whoever records a whole handshake holds a proof to
guess against offline."""
HOW_TO_MAKE = "make one with `mpifed token FILE` (or `openssl rand -hex 32 > FILE`, then chmod 600 FILE)"


class TokenError(ValueError):
    """A token that cannot be used: missing, readable by others, empty or too weak."""


_ALPHABETS = ("0123456789", "0123456789abcdef", "0123456789ABCDEF", "abcdefghijklmnopqrstuvwxyz",
              "0123456789abcdefghijklmnopqrstuvwxyz",
              "0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ",
              "0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ+/=-_",
              "".join(chr(c) for c in range(32, 127)))


def token_bits(token: bytes) -> float:
    """A cautious estimate of a token's entropy in bits: the lesser of its length times log2 of the
    smallest usual alphabet that holds all its characters (hex, letters, base64, printable, bytes), and
    its length times the entropy of its own character frequencies. A random string scores near its true
    strength; words ("correct horse battery staple": 97), repeats and short strings score low."""
    if not token:
        return 0.0
    text = token.decode("latin-1")
    alphabet = next((len(a) for a in _ALPHABETS if set(text) <= set(a)), 256)
    counts = Counter(text).values()
    shannon = -sum(c / len(text) * math.log2(c / len(text)) for c in counts)
    return len(text) * min(math.log2(alphabet), shannon)


def new_token() -> str:
    """A fresh token of 256 random bits, as URL-safe text (what `mpifed token FILE` writes)."""
    return secrets.token_urlsafe(32)


def read_token(token_file: str) -> bytes:
    """The shared secret: MPIFED_TOKEN, else the file federation.token_file (which must be mode 0600).
    Raises TokenError, in one line naming where it came from and how to make a good one, when there is
    none or it has fewer than MIN_TOKEN_BITS. The token itself is never printed."""
    if os.environ.get("MPIFED_TOKEN"):
        where, token = "MPIFED_TOKEN", os.environ["MPIFED_TOKEN"].encode()
    elif not token_file:
        raise TokenError("facilities launched separately need a shared token: set federation.token_file to a file "
                         f"readable only by you, or MPIFED_TOKEN; {HOW_TO_MAKE}")
    else:
        path = Path(token_file)
        where = f"federation.token_file {path}"
        try:
            mode = path.stat().st_mode
        except OSError:
            raise TokenError(f"{where}: no such file; {HOW_TO_MAKE}") from None
        if mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise TokenError(f"{where}: mode {stat.S_IMODE(mode):04o} lets others read it; chmod 600 {path}")
        token = path.read_bytes().strip()
        if not token:
            raise TokenError(f"{where}: the file is empty; {HOW_TO_MAKE}")
    bits = token_bits(token)
    if bits < MIN_TOKEN_BITS:
        raise TokenError(f"{where}: the token is too weak (about {bits:.0f} bits of entropy, at least "
                         f"{MIN_TOKEN_BITS} needed: whoever records one handshake could guess it offline); "
                         f"{HOW_TO_MAKE}")
    return token


def given_token(token_file: str) -> bytes | None:
    """`read_token` where a token is given (MPIFED_TOKEN or `token_file` set), else None: a single launch
    seals its links across facilities only when given one."""
    return read_token(token_file) if os.environ.get("MPIFED_TOKEN") or token_file else None
