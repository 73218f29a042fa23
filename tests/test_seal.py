"""Link sealing (mpifed/comm/seal.py): both ends derive their keys independently and talk; the key schedule
agrees with a second HKDF written here from RFC 5869; and every attack a tunnel, a login node or a relay
could make (bit flips, injection, replay, reordering, truncation, reflection, a missing token) is run and
must fail with a SealError that names the link, after which the link refuses even good frames."""
from __future__ import annotations

import hashlib
import hmac

import numpy as np
import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from mpifed.comm import seal
from mpifed.comm.seal import (COUNTER_END, FRAME_LIMIT, NONCE_BYTES, OVERHEAD, ROLES, Channel, Keys, SealError,
                              check_proof, derive, proof)

TOKEN = bytes(range(32))
CALLER_NONCE = bytes(range(100, 100 + NONCE_BYTES))
HUB_NONCE = bytes(range(200, 200 + NONCE_BYTES))
CONTEXT = "mpifed link f1->f0 v1"


def hkdf_sha256(ikm: bytes, salt: bytes, info: bytes, length: int) -> bytes:
    """RFC 5869, extract then expand, written against the RFC rather than the module."""
    prk = hmac.new(salt or bytes(32), ikm, hashlib.sha256).digest()
    okm, block = b"", b""
    for i in range(1, -(-length // 32) + 1):
        block = hmac.new(prk, block + info + bytes([i]), hashlib.sha256).digest()
        okm += block
    return okm[:length]


def ends() -> tuple[Channel, Channel]:
    """The two ends of one link, each deriving its own keys as it would on its own site."""
    caller = Channel(derive(TOKEN, CALLER_NONCE, HUB_NONCE, "caller", CONTEXT), "link f1->f0 (caller)")
    hub = Channel(derive(TOKEN, CALLER_NONCE, HUB_NONCE, "hub", CONTEXT), "link f1->f0 (hub)")
    return caller, hub


def refused(channel: Channel, frame: bytes | bytearray, *words: str) -> str:
    with pytest.raises(SealError) as caught:
        channel.open(frame)
    message = str(caught.value)
    assert channel.name in message and "\n" not in message
    for word in words:
        assert word in message
    return message


def test_rfc5869_case1_checks_the_test_hkdf():
    okm = hkdf_sha256(bytes([0x0B] * 22), bytes(range(0x0D)), bytes(range(0xF0, 0xFA)), 42)
    assert okm.hex() == ("3cb25f25faacd57a90434f64d0362f2a2d2d0a90cf1a5a4c5db02d56ecc4c5bf34007208d5b887185865")


def test_keys_are_the_documented_hkdf():
    salt = CALLER_NONCE + HUB_NONCE
    up = hkdf_sha256(TOKEN, salt, f"mpifed/seal/v1|caller->hub|{CONTEXT}".encode(), 32)
    down = hkdf_sha256(TOKEN, salt, f"mpifed/seal/v1|hub->caller|{CONTEXT}".encode(), 32)
    assert derive(TOKEN, CALLER_NONCE, HUB_NONCE, "caller", CONTEXT) == Keys(send=up, recv=down)
    assert derive(TOKEN, CALLER_NONCE, HUB_NONCE, "hub", CONTEXT) == Keys(send=down, recv=up)
    proof_key = hkdf_sha256(TOKEN, b"", b"mpifed/seal/v1|proof", 32)
    assert proof(TOKEN, "hub", b"abc") == hmac.new(proof_key, b"hub|abc", hashlib.sha256).digest()


def test_frame_format_opens_with_a_plain_aesgcm():
    caller, _ = ends()
    up = derive(TOKEN, CALLER_NONCE, HUB_NONCE, "caller", CONTEXT).send
    for counter, payload in enumerate([b"first", b"", bytes(1000)]):
        frame = caller.seal(payload, aad=b"ctl")
        header = counter.to_bytes(8, "big")
        assert len(frame) == len(payload) + OVERHEAD and frame[:8] == header
        nonce = bytes(4) + header
        assert AESGCM(up).decrypt(nonce, bytes(frame[8:]), header + b"ctl") == payload


def test_round_trip_both_directions_in_order():
    caller, hub = ends()
    rng = np.random.default_rng(0)
    for i in range(60):
        up = rng.bytes(int(rng.integers(0, 5000)))
        down = rng.bytes(int(rng.integers(0, 5000)))
        aad = f"round {i}".encode()
        assert hub.open(caller.seal(up, aad), aad) == up
        assert caller.open(hub.seal(memoryview(down), aad), aad) == down
    weights = rng.standard_normal(1000).astype(np.float32)        # a typed buffer: 4000 bytes, not 1000
    got = np.frombuffer(hub.open(caller.seal(weights)), np.float32)
    assert np.array_equal(got, weights)
    big = rng.bytes(3 << 20)
    assert hub.open(bytes(caller.seal(big))) == big


def test_seal_into_and_open_into_reuse_buffers():
    caller, hub = ends()
    send = bytearray(4096 + OVERHEAD)
    dest = np.zeros(1024, np.float32)
    for i in range(5):
        payload = np.full(1024, i, np.float32)
        n = caller.seal_into(payload, send)
        assert n == 4096 + OVERHEAD
        assert hub.open_into(memoryview(send)[:n], dest) == 4096
        assert np.array_equal(dest, payload)
    with pytest.raises(ValueError, match="output buffer"):
        caller.seal_into(bytes(10), bytearray(10 + OVERHEAD - 1))


@pytest.mark.parametrize("where", ["header high byte", "header counter byte", "body", "tag"])
def test_a_flipped_bit_is_refused_and_the_link_dies(where):
    caller, hub = ends()
    assert hub.open(caller.seal(b"hello")) == b"hello"
    good = caller.seal(b"the weights of round 3 " * 40)
    index = {"header high byte": 0, "header counter byte": 7, "body": 8 + 100, "tag": len(good) - 1}[where]
    bad = bytearray(good)
    bad[index] ^= 0x01
    refused(hub, bad, "tampered or not sealed under this link's key")
    refused(hub, good, "no longer trusted")                      # a valid next frame is refused too
    refused(hub, caller.seal(b"and the one after"), "no longer trusted")


def test_a_frame_under_another_token_is_refused():
    _, hub = ends()
    forger = Channel(derive(b"not the token", CALLER_NONCE, HUB_NONCE, "caller", CONTEXT), "forger")
    refused(hub, forger.seal(b"stop training"), "tampered")


def test_a_relay_without_the_token_cannot_read_or_write():
    caller, hub = ends()
    frame = caller.seal(b"secret gradients")
    relay_keys = derive(b"guessed token", CALLER_NONCE, HUB_NONCE, "hub", CONTEXT)   # saw both nonces
    refused(Channel(relay_keys, "relay"), frame, "tampered")
    assert b"secret gradients" not in bytes(frame)
    assert hub.open(frame) == b"secret gradients"                # the real hub still can


def test_keys_depend_on_every_input():
    base = derive(TOKEN, CALLER_NONCE, HUB_NONCE, "caller", CONTEXT)
    assert base.send != base.recv
    other_nonce = bytes(NONCE_BYTES)
    variants = [derive(TOKEN, other_nonce, HUB_NONCE, "caller", CONTEXT),
                derive(TOKEN, CALLER_NONCE, other_nonce, "caller", CONTEXT),
                derive(TOKEN, HUB_NONCE, CALLER_NONCE, "caller", CONTEXT),
                derive(TOKEN + b"x", CALLER_NONCE, HUB_NONCE, "caller", CONTEXT),
                derive(TOKEN, CALLER_NONCE, HUB_NONCE, "caller", CONTEXT + " other")]
    seen = {base.send, base.recv}
    for keys in variants:
        assert keys.send not in seen and keys.recv not in seen
        seen |= {keys.send, keys.recv}
    assert TOKEN.hex() not in repr(base) and base.send.hex() not in repr(base) and "send" not in repr(base)


def test_derive_rejects_bad_input():
    with pytest.raises(ValueError, match="caller nonce is 15 bytes"):
        derive(TOKEN, CALLER_NONCE[:-1], HUB_NONCE, "caller", CONTEXT)
    with pytest.raises(ValueError, match="hub nonce is 17 bytes"):
        derive(TOKEN, CALLER_NONCE, HUB_NONCE + b"x", "hub", CONTEXT)
    with pytest.raises(ValueError, match="not one of caller, hub"):
        derive(TOKEN, CALLER_NONCE, HUB_NONCE, "newcomer", CONTEXT)
    with pytest.raises(ValueError, match="empty"):
        derive(b"", CALLER_NONCE, HUB_NONCE, "caller", CONTEXT)
    with pytest.raises(ValueError, match="equal"):
        Keys(send=bytes(32), recv=bytes(32))


def test_replay_is_refused():
    caller, hub = ends()
    frame = caller.seal(b"once")
    assert hub.open(frame) == b"once"
    refused(hub, frame, "replayed or reordered: frame 0 where 1 was next")


def test_reorder_and_a_dropped_frame_are_refused():
    caller, hub = ends()
    first, second = caller.seal(b"1"), caller.seal(b"2")
    refused(hub, second, "replayed or reordered: frame 1 where 0 was next")
    refused(hub, first, "no longer trusted")
    caller, hub = ends()
    caller.seal(b"dropped on the way")
    refused(hub, caller.seal(b"after the gap"), "frame 1 where 0 was next")


def test_truncated_frames_are_refused():
    caller, hub = ends()
    frame = caller.seal(b"x" * 100)
    refused(hub, frame[:-1], "tampered")
    caller, hub = ends()
    refused(hub, caller.seal(b"x" * 100)[:OVERHEAD - 1], f"truncated: {OVERHEAD - 1} bytes, a frame has at least "
                                                           f"{OVERHEAD}")
    caller, hub = ends()
    refused(hub, b"", "truncated: 0 bytes")


def test_a_frame_reflected_to_its_sender_is_refused():
    caller, hub = ends()
    refused(caller, caller.seal(b"to the hub"), "tampered")
    refused(hub, hub.seal(b"to the caller"), "tampered")


def test_associated_data_must_match():
    caller, hub = ends()
    with pytest.raises(SealError, match="tampered"):
        hub.open(caller.seal(b"payload", aad=b"kind=weights"), aad=b"kind=control")


def test_proof():
    transcript = CALLER_NONCE + HUB_NONCE + b"join v1"
    for role in ROLES:
        mac = proof(TOKEN, role, transcript)
        assert len(mac) == 32 and check_proof(TOKEN, role, transcript, mac)
        assert not check_proof(TOKEN + b"!", role, transcript, mac)
        other = ROLES[1 - ROLES.index(role)]
        assert not check_proof(TOKEN, other, transcript, mac)
        for i in (0, len(transcript) - 1):
            changed = bytearray(transcript)
            changed[i] ^= 0x80
            assert not check_proof(TOKEN, role, bytes(changed), mac)
        assert not check_proof(TOKEN, role, transcript, mac[:-1])
    # never the AEAD key: a proof is not any of the link's keys
    keys = derive(TOKEN, CALLER_NONCE, HUB_NONCE, "caller", CONTEXT)
    assert proof(TOKEN, "caller", b"") not in (keys.send, keys.recv)


def test_frame_limit():
    caller, hub = ends()
    with pytest.raises(ValueError, match="FRAME_LIMIT"):
        caller.seal(bytes(FRAME_LIMIT + 1))
    assert hub.open(caller.seal(b"after")) == b"after"          # the refused seal used no counter


def test_a_too_large_frame_is_refused_before_decrypting(monkeypatch):
    _, hub = ends()

    class NoDecrypt:
        def decrypt(self, *args):
            raise AssertionError("decrypted a frame over FRAME_LIMIT")

        decrypt_into = decrypt

    monkeypatch.setattr(hub, "_recv", NoDecrypt())
    refused(hub, bytearray(FRAME_LIMIT + OVERHEAD + 1), "too large")


def test_counter_exhaustion_stops_sealing(monkeypatch):
    caller, _ = ends()
    monkeypatch.setattr(caller, "_sent", COUNTER_END)
    with pytest.raises(SealError, match="exhausted") as caught:
        caller.seal(b"one too many")
    assert caller.name in str(caught.value)


def test_module_never_pickles_or_prints():
    source = open(seal.__file__).read()
    assert "pickle" not in source and "print(" not in source
