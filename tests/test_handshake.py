"""The handshake between gateways and the token it proves (mpifed/comm/handshake.py, secret.py): the
caller proves first, a wrong or replayed proof is refused without the listener proving anything, what
follows is sealed, hostile bytes never raise, and a weak token is refused at start in one line."""
import base64
import json
import secrets
import stat
import subprocess
import sys

import pytest

from conftest import MPIEXEC, WORKERS, mpifed, rank_env
from mpifed.comm import handshake, secret

RIGHT, WRONG = secrets.token_urlsafe(32), secrets.token_urlsafe(32)


def _pair(case: str, tmp_path) -> dict[int, dict]:
    env = {**rank_env(), "T_RIGHT": RIGHT, "T_WRONG": WRONG}
    result = subprocess.run([MPIEXEC, "-n", "2", sys.executable, str(WORKERS / "handshake_worker.py"), case,
                             str(tmp_path)], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    seen = {rank: json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1)}
    for said in (result.stdout + result.stderr, json.dumps(seen)):
        assert RIGHT not in said and WRONG not in said
    return seen


def test_the_same_token_gives_a_sealed_link_both_ways(tmp_path):
    seen = _pair("right", tmp_path)
    listener, caller = seen[0]["results"][0], seen[1]
    assert listener == {"problems": [], "sealed": True, "wake": False, "got": {"x": 41}}
    assert caller == {"rank": 1, "problems": [], "sealed": True, "back": {"back": 42}}


def test_a_wrong_token_is_refused_on_both_sides_and_the_listener_never_proves(tmp_path):
    seen = _pair("wrong", tmp_path)
    assert seen[0]["results"][0]["problems"] == [handshake.TOKEN_DIFFERS]
    # had the listener sent its proof, the caller would also report that the hub's proof failed
    assert seen[1]["problems"] == [handshake.TOKEN_DIFFERS] and not seen[1]["sealed"]


def test_a_replayed_hello_and_proof_are_refused(tmp_path):
    seen = _pair("replay", tmp_path)
    honest, replay = seen[0]["results"]
    assert honest["sealed"] and honest["got"] == {"x": 1}
    assert replay["problems"] == [handshake.TOKEN_DIFFERS] and not replay["sealed"]
    assert seen[1]["replayed"] == {"problems": [handshake.TOKEN_DIFFERS]}  # no proof in the answer


def test_a_flipped_sealed_byte_ends_the_link_naming_it(tmp_path):
    listener = _pair("flip", tmp_path)[0]["results"][0]
    assert listener["sealed"] and "test link" in listener["unanswered"], listener


def test_deep_nesting_is_dropped_without_an_exception(tmp_path):
    no_hello = "sent no valid hello (not an mpifed facility, or another version)"
    assert _pair("flood", tmp_path)[0]["results"][0] == {"unanswered": no_hello}


@pytest.mark.parametrize("data", [b"[" * 60000, b"{" * 100 + b"}" * 100, b"\xff\xfe", b"[1, 2]", b"null",
                                  b'{"a": "' + b"[" * 5000 + b'"}'])
def test_parse_reads_anything_as_an_object_or_nothing(data):
    parsed = handshake.parse(data)
    assert isinstance(parsed, dict)
    assert parsed == ({"a": "[" * 5000} if data.startswith(b'{"a"') else {})


def test_token_strength_estimates():
    for weak in (b"correct horse battery staple", b"guess", b"a" * 200, b"ab" * 40, secrets.token_hex(8).encode()):
        assert secret.token_bits(weak) < secret.MIN_TOKEN_BITS, weak
    for _ in range(200):
        for strong in (secret.new_token(), secrets.token_hex(32)):
            assert secret.token_bits(strong.encode()) >= secret.MIN_TOKEN_BITS


def test_mpifed_token_writes_a_private_strong_token_and_rotates_only_when_asked(tmp_path):
    path = tmp_path / "token"
    made = mpifed("token", str(path))
    assert made.returncode == 0, made.stderr
    first = path.read_bytes().strip()
    # 32 random bytes, URL-safe base64; the start-up check's estimate of so short a string runs below
    # its 256 bits (185 to 233 over 20,000 fresh tokens: 6% under 200), never near the 128 it asks for
    assert stat.S_IMODE(path.stat().st_mode) == 0o600 and len(base64.urlsafe_b64decode(first + b"=")) == 32
    assert secret.token_bits(first) >= secret.MIN_TOKEN_BITS + 40
    assert first.decode() not in made.stdout + made.stderr
    again = mpifed("token", str(path))
    assert again.returncode == 2 and path.read_bytes().strip() == first
    assert again.stderr.strip() == (f"mpifed token: error: {path} exists; pass --force to replace it (rotating the "
                                    "token), or choose another file")
    rotated = mpifed("token", "--force", str(path))
    assert rotated.returncode == 0 and path.read_bytes().strip() != first
    assert stat.S_IMODE(path.stat().st_mode) == 0o600 and [p.name for p in tmp_path.iterdir()] == ["token"]


def test_a_weak_token_is_refused_at_start_in_one_line_with_exit_2(tmp_path):
    from test_join import _config, _run

    config = _config(tmp_path, {"hub": 1, "edge": 1})
    env = {**rank_env(), "MPIFED_TOKEN": "correct horse battery staple"}
    result = subprocess.run([MPIEXEC, "-n", "1", *_run(config, "hub")], capture_output=True, text=True, env=env,
                            timeout=120)
    assert result.returncode == 2, result.stdout + result.stderr
    assert result.stderr.strip() == (
        "mpifed run: error: MPIFED_TOKEN: the token is too weak (about 98 bits of entropy, at least 128 needed: "
        "whoever records one handshake could guess it offline); make one with `mpifed token FILE` (or "
        "`openssl rand -hex 32 > FILE`, then chmod 600 FILE)")
    assert "correct horse" not in result.stdout and not list((tmp_path / "run").glob("*"))
