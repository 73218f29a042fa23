"""Links between gateways (mpifed/comm/link.py): the exchange across facilities is point to point, sealed
under the federation's token; every group operation delivers exactly what was sent, sealed or not; a
message flipped, replayed, injected or cut short between sealing and sending ends the exchange in one
line naming the phase and the link, and one that never comes ends it at the exchange's deadline; control
values cross facilities through their leaders' links alone."""
import json
import secrets
import subprocess
import sys

import numpy as np
import pytest

from conftest import MPIEXEC, WORKERS, rank_env
from mpifed.comm.watchdog import ABORT_CODE

TOKEN = secrets.token_urlsafe(32)


def _run(case: str, ranks: int, tmp_path, sealed: bool = True) -> tuple[subprocess.CompletedProcess, dict[int, dict]]:
    env = {**rank_env(), "MPIFED_TOKEN": TOKEN} if sealed else {k: v for k, v in rank_env().items()
                                                                 if k != "MPIFED_TOKEN"}
    result = subprocess.run([MPIEXEC, "-n", str(ranks), sys.executable, str(WORKERS / "link_worker.py"), case,
                             str(tmp_path)], capture_output=True, text=True, env=env, timeout=120)
    assert TOKEN not in result.stdout + result.stderr
    return result, {r: json.loads(p.read_text()) for r in range(ranks) if (p := tmp_path / f"rank{r}.json").exists()}


@pytest.mark.parametrize("sealed", [True, False], ids=["sealed", "plain"])
def test_every_group_operation_delivers_what_was_sent(tmp_path, sealed):
    result, seen = _run("ops", 4, tmp_path, sealed)
    assert result.returncode == 0, result.stdout + result.stderr
    for rank in range(4):
        assert seen[rank]["sealed"] is sealed
        assert seen[rank]["exchange"] and seen[rank]["allgather"] and seen[rank]["bcast"], seen[rank]
        assert seen[rank]["after_subset"], seen[rank]
    assert [seen[r]["subset"] for r in (0, 1, 3)] == [[0, 3, True], [1, 3, True], [2, 3, True]]
    assert "subset" not in seen[2]


def test_control_values_cross_facilities_through_the_leaders_alone(tmp_path):
    """Three facilities of 2, 1 and 2 ranks: every rank gets the same sums (numpy's, to rounding; the
    same bits everywhere), maxima, texts in the world's order and the hub's broadcast."""
    result, seen = _run("across", 5, tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert [seen[r]["sealed"] for r in range(5)] == [True, None, True, True, None]  # leaders hold the links
    exact = sum(np.random.default_rng([r, 5, 0]).standard_normal(5).astype(np.float32).astype(np.float64)
                for r in range(5))
    for r in range(5):
        np.testing.assert_allclose(seen[r]["sum"], exact, rtol=1e-12)
        assert seen[r]["sum"] == seen[0]["sum"]
        assert seen[r]["max"] == [4.0, 0.0]
        assert seen[r]["texts"] == ["é" * i for i in range(5)]
        assert seen[r]["bcast"] == "from the hub"
        assert seen[r]["bytes"] == (np.arange(30_000, dtype=np.uint8).tolist())[::997]
    # an announcement over the limit: every leader refuses it, the hub before it sends a byte of it
    assert {seen[r]["over"] for r in (0, 2, 3)} == {"the global root announced 2000 bytes to share (at most 1000)"}


def test_a_list_of_texts_that_does_not_parse_is_one_error():
    """Two facilities of 2 and 1 ranks. Only a peer holding the token could send a bad list; it is still
    one error, never an exception of the parser, nor a list shifted out of the world's order."""
    from mpifed.comm.across import _texts
    from mpifed.comm.link import LinkError

    def part(*texts: bytes) -> bytes:
        return np.array([len(texts), *map(len, texts)], "<i8").tobytes() + b"".join(texts)

    good = part(b"a", b"bcd") + part(b"ef")
    assert _texts(np.frombuffer(good, np.uint8), [2, 1]) == ["a", "bcd", "ef"]
    for bad, why in ((good[:-1], "lengths past its end"), (good + b"x", "1 bytes after the last part"),
                     (part(b"a") + part(b"b", b"c"), "facility 0 holds 1 texts, not 2"),
                     (np.array([2, 1, -4], "<i8").tobytes(), "lengths past its end"),
                     (np.array([2, 1 << 62, 1 << 62], "<i8").tobytes(), "lengths past its end"),
                     (part(b"a", b"\xff") + part(b"c"), "invalid start byte"), (good[:5], "holds -1 texts")):
        with pytest.raises(LinkError, match="a facility's leader sent a list of texts that does not parse"):
            try:
                _texts(np.frombuffer(bad, np.uint8), [2, 1])
            except LinkError as exc:
                assert why in str(exc)
                raise


@pytest.mark.parametrize("how,what", [
    ("flip", "a frame does not open (tampered or not sealed under this link's key)"),
    ("replay", "a frame does not open (replayed or reordered: frame 0 where 2 was next)"),
    ("inject", "a frame does not open (tampered or not sealed under this link's key)"),
    ("short", "a message of 1243 bytes where 1248 were agreed (cut short, padded or injected on the way)"),
    ("long", "a message longer than agreed (padded or injected on the way)"),
])
def test_a_tampered_message_ends_the_exchange_naming_phase_and_link(tmp_path, how, what):
    result, seen = _run(how, 2, tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    expected = (f"round 2: exchange: combining the updates: link f0<->f1 (gateway 0): {what}; "
                "the link is not trusted again")
    assert seen[0]["error"] == expected
    # nothing tampered reached the receiver as values: the replay's first message was the real one
    assert seen[0].get("message 1", True) is True and "message 2" not in seen[0]


def test_a_dropped_message_ends_the_job_at_the_exchanges_deadline(tmp_path):
    result, _ = _run("drop", 2, tmp_path)
    assert result.returncode == ABORT_CODE, result.stdout + result.stderr
    assert ("mpifed: error: round 2: exchange: combining the updates did not finish within 5 s "
            "(federation.timeout_s); aborting the job") in result.stderr
