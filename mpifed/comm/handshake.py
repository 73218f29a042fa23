"""The handshake between two gateways' leaders on a fresh connection, and the keys it derives.

Whoever connects (the *caller*: a facility joining, the federation admitting a facility that comes back,
a wake-up call) proves first; the side that accepted (the *listener*: the hub's door, a facility
waiting to come back) proves only to a caller that has proved, so a stranger learns nothing to crack a
token with offline:

  caller   -> listener   hello: what the caller says of itself, nonce_c (16 random bytes)
  listener -> caller     nonce_l, the protocol version
  caller   -> listener   proof_c = HMAC(k_proof, "caller" | T),   T = sha256(context, hello, nonce_l)
  listener -> caller     its answer (its own hello, the verdict), proof_l = HMAC(k_proof, "hub" | T | answer)
                         (a caller whose proof failed gets the verdict alone, no proof)
  caller   -> listener   whether proof_l held

Both proofs cover both nonces, both roles and everything said, so nothing can be replayed or changed
on the way. A relay that passes the messages on unread sees them through, but the keys both ends then
derive (mpifed/comm/seal.py: HKDF of the token and both nonces, one per direction) are its secret no
more than the token is, and whatever follows on the link is sealed under them (`Sealed`).

The token itself (reading, strength, making one) is mpifed/comm/secret.py's.

It runs over any `Wire` (mpifed/comm/wire.py): an MPI intercommunicator or a TCP stream.
Every message is a JSON object, read with a deadline (HANDSHAKE_S), at most
`LIMIT` bytes and `DEPTH` levels deep; anything else is a broken handshake (`Unanswered`), never an
exception that escapes: nothing here is unpickled or trusted before its proof.
"""
from __future__ import annotations

import hashlib
import json
import secrets
from dataclasses import dataclass, field
from typing import Callable

from mpifed.comm import seal
from mpifed.comm.wire import Tampered, Unanswered, Wire

PROTOCOL = 2
"""The handshake's version: 2 since the caller proves first (version 1 had the hub answer any caller
with an HMAC of the token, which cracked a weak token offline from one probe)."""
HANDSHAKE_S = 10.0
"""How long either side waits for the other's next message: a peer that connects and says nothing is
dropped after this, and only this delays the facilities queued behind it."""
LIMIT = 16 << 10
"""Bytes a handshake message may hold; a larger one is refused unread."""
DEPTH = 4
"""How deeply a handshake message may nest; a deeper one is refused before it is parsed."""
TOKEN_DIFFERS = "the shared token differs (HMAC check failed): set the same MPIFED_TOKEN or token_file on every site"


# ------------------------------------------------------------------------------------------- messages
def send(wire: Wire, message: dict) -> None:
    """A JSON object to the other side's leader."""
    wire.send_bytes(json.dumps(message).encode())


def receive(wire: Wire, timeout_s: float = HANDSHAKE_S) -> dict:
    """The next message as a JSON object, within `timeout_s`: what is not one (or nests deeper than
    DEPTH) reads as {}. Raises Unanswered."""
    return parse(wire.receive_bytes(LIMIT, timeout_s))


def parse(data: bytes) -> dict:
    """`data` as a JSON object, or {} for anything else: invalid UTF-8 or JSON, another type, or nesting
    deeper than DEPTH, which is counted before the parser sees it (a deep one overflows its recursion)."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        return {}
    if _nesting(text) > DEPTH:
        return {}
    try:
        message = json.loads(text)
    except (ValueError, RecursionError):
        return {}
    return message if isinstance(message, dict) else {}


def _nesting(text: str) -> int:
    """How deeply the brackets of JSON text nest, strings left out."""
    depth = deepest = 0
    quoted = escaped = False
    for char in text:
        if quoted:
            if escaped:
                escaped = False
            elif char == "\\":
                escaped = True
            elif char == '"':
                quoted = False
        elif char == '"':
            quoted = True
        elif char in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif char in "]}":
            depth -= 1
    return deepest


def shown(value: object, width: int = 40) -> str:
    """A value a peer sent, as it may appear in a line of ours: quoted, escaped and cut short."""
    text = repr(value if isinstance(value, (str, int, float, bool)) else str(type(value).__name__))
    return text if len(text) <= width else text[:width - 3] + "..."


# ---------------------------------------------------------------------------------------- the proofs
def _canonical(message: dict) -> bytes:
    return json.dumps(message, sort_keys=True, separators=(",", ":")).encode()


def _transcript(context: str, hello: dict, listener_nonce: bytes) -> bytes:
    return hashlib.sha256(b"|".join([f"mpifed/{PROTOCOL}/{context}".encode(), _canonical(hello),
                                     listener_nonce])).digest()


def _nonce(message: dict, key: str = "nonce") -> bytes:
    """A peer's nonce (hex) as bytes, or b"" where it sent none of the right length."""
    value = message.get(key)
    try:
        nonce = bytes.fromhex(value) if isinstance(value, str) else b""
    except ValueError:
        return b""
    return nonce if len(nonce) == seal.NONCE_BYTES else b""


def _proof_of(message: dict) -> bytes:
    value = message.get("proof")
    try:
        return bytes.fromhex(value) if isinstance(value, str) and len(value) <= 128 else b""
    except ValueError:
        return b""


def _problems(message: dict) -> list[str]:
    """The verdict a peer sent: its "problems", each as text cut to a line's length."""
    problems = message.get("problems")
    if not isinstance(problems, list):
        return []
    # printed on our terminal though perhaps nobody proved them: one line each, no control characters
    return ["".join(c if c.isprintable() else "?" for c in str(p)[:500]) for p in problems[:20]]


class Sealed:
    """What follows a handshake on the same wire: JSON objects sealed under the keys both ends derived
    (mpifed/comm/seal.py); a message that does not open ends the link (`Unanswered`)."""

    def __init__(self, wire: Wire, channel: seal.Channel) -> None:
        self.wire, self.channel = wire, channel

    def send(self, message: dict) -> None:
        self.wire.send_bytes(self.channel.seal(json.dumps(message).encode()))

    def close(self) -> None:
        """Hang up (a stream's socket is closed; an MPI wire is the caller's to disconnect)."""
        close = getattr(self.wire, "close", None)
        if close is not None:
            close()

    def receive(self, timeout_s: float = HANDSHAKE_S) -> dict:
        try:
            return parse(self.channel.open(self.wire.receive_bytes(LIMIT + seal.OVERHEAD, timeout_s)))
        except seal.SealError as exc:
            raise Tampered(f"sent a message that does not open ({exc})") from None


@dataclass
class Outcome:
    """One end's view of a finished handshake."""

    hello: dict
    """On the listener, the caller's hello; on the caller, the listener's answer."""
    problems: list[str] = field(default_factory=list)
    """Why the two do not go on together (empty: they do)."""
    wake: bool = False
    """On the listener: a proved wake-up call (its own, see join.wake)."""
    link: Sealed | None = None
    """Where both proved: the sealed messages that may follow."""


def call(wire: Wire, hello: dict, token: bytes, context: str, wake: bool = False,
         first_s: float = HANDSHAKE_S) -> Outcome:
    """The caller's side (on its leader): say `hello`, prove the token, check the listener's proof.
    With `wake`, a wake-up call: it proves and hangs up, expecting no answer. `first_s`: how long the
    listener may take to answer the hello (a listener that is still getting there: see link.Mesh),
    every later message HANDSHAKE_S. Raises Unanswered."""
    mine = secrets.token_bytes(seal.NONCE_BYTES)
    said = {**hello, "wake": True} if wake else dict(hello)
    said.update(nonce=mine.hex(), protocol=PROTOCOL)
    send(wire, said)
    reply = receive(wire, first_s)
    theirs = _nonce(reply)
    if not theirs and _problems(reply):
        return Outcome(reply, _problems(reply))
    if not theirs:
        raise Unanswered(f"sent no nonce (protocol {shown(reply.get('protocol'))}, this mpifed speaks {PROTOCOL}: run "
                         "the same mpifed version everywhere)")
    transcript = _transcript(context, said, theirs)
    send(wire, {"proof": seal.proof(token, "caller", transcript).hex()})
    if wake:
        return Outcome(reply)
    answer = receive(wire)
    proof = _proof_of(answer)
    answer.pop("proof", None)
    if not proof:
        return Outcome(answer, _problems(answer) or ["the other side sent no verdict"])
    held = seal.check_proof(token, "hub", transcript + hashlib.sha256(_canonical(answer)).digest(), proof)
    send(wire, {"ok": held})
    problems = _problems(answer) if isinstance(answer.get("problems"), list) else ["the other side sent no verdict"]
    if not held:
        return Outcome(answer, problems + [TOKEN_DIFFERS])
    keys = seal.derive(token, mine, theirs, "caller", context)
    return Outcome(answer, problems, link=Sealed(wire, seal.Channel(keys, f"{context} link")))


def listen(wire: Wire, token: bytes, context: str, decide: Callable[[dict], dict],
           first_s: float = HANDSHAKE_S) -> Outcome:
    """The listener's side (on its leader): hear the caller's hello (within `first_s`) and proof, then
    answer with `decide(hello)` (a JSON object; its "problems", a list, is the verdict) and its own
    proof. A caller without a valid proof gets the verdict TOKEN_DIFFERS and no proof. Raises Unanswered."""
    hello = receive(wire, first_s)
    theirs = _nonce(hello)
    if not theirs:
        raise Unanswered("sent no valid hello (not an mpifed facility, or another version)")
    if hello.get("protocol") != PROTOCOL:
        problem = (f"protocol version {shown(hello.get('protocol'))} differs from this side's {PROTOCOL} (run the same "
                   "mpifed version everywhere)")
        send(wire, {"problems": [problem]})
        return Outcome(hello, [problem])
    mine = secrets.token_bytes(seal.NONCE_BYTES)
    send(wire, {"nonce": mine.hex(), "protocol": PROTOCOL})
    transcript = _transcript(context, hello, mine)
    proved = seal.check_proof(token, "caller", transcript, _proof_of(receive(wire)))
    if hello.get("wake") is True:
        return Outcome(hello, [] if proved else ["a wake-up call with a wrong token"], wake=proved)
    if not proved:
        send(wire, {"problems": [TOKEN_DIFFERS]})
        return Outcome(hello, [TOKEN_DIFFERS])
    answer = decide(hello)
    problems = list(answer.get("problems", []))
    send(wire, {**answer, "proof": seal.proof(token, "hub", transcript
                                               + hashlib.sha256(_canonical(answer)).digest()).hex()})
    if receive(wire).get("ok") is not True:
        problems.append(TOKEN_DIFFERS)
    if problems:
        return Outcome(hello, problems)
    keys = seal.derive(token, theirs, mine, "hub", context)
    return Outcome(hello, link=Sealed(wire, seal.Channel(keys, f"{context} link")))
