"""Facilities launched separately (one mpiexec each, as on separate sites) join over MPI ports: the
result equals one `simulate` launch, and a wrong token, a different model or a missing facility each
end with the documented error, bounded by the join timeout, without touching the last checkpoint."""
import secrets
import shutil
import subprocess
import sys
import time

import h5py
import pytest

from conftest import MPIEXEC, WORKERS, launch_all, mpifed, rank_env
from mpifed import configfile
from mpifed.checkpoint import format as checkpoint

TOKEN = secrets.token_urlsafe(32)  # a fresh one per run, as `mpifed token` writes


def _config(tmp_path, ranks: dict[str, int], *sets: str):
    base = ["data.seq_len=64", "train.local_steps=3", "train.micro_batch=4", "federation.rounds=2",
            f"federation.rendezvous={tmp_path / 'port.txt'}", "federation.join_timeout_s=60",
            f"checkpoint.dir={tmp_path / 'run'}"]
    data = {"facility": [{"name": name, "ranks": n} for name, n in ranks.items()]}
    cfg = configfile.from_dict(configfile.apply_sets(data, base + list(sets)))
    (tmp_path / "c.toml").write_text(configfile.dump_toml(cfg))
    return tmp_path / "c.toml"


def _run(config, name):
    return [sys.executable, "-m", "mpifed", "run", str(config), "--facility", name]


def _worker(config, name, out):
    return [sys.executable, str(WORKERS / "join_worker.py"), str(config), name, str(out)]


def _model(path):
    with h5py.File(path) as h5:
        return {name: h5["model"][name][()].tobytes() for name in h5["model"]}


@pytest.fixture(scope="module")
def joined_run(tmp_path_factory):
    """Two separate launches, the newcomer started first (it waits for the hub's rendezvous file)."""
    tmp = tmp_path_factory.mktemp("join2")
    config = _config(tmp, {"hub": 2, "edge": 1}, "facility.edge.engine=fsdp")
    results = launch_all([(1, _worker(config, "edge", tmp), {"MPIFED_TOKEN": TOKEN}),
                       (2, _worker(config, "hub", tmp), {"MPIFED_TOKEN": TOKEN})], timeout=240)
    for r in results:
        assert r.returncode == 0, r.stderr
    return tmp, results


def test_two_separate_launches_equal_one_simulate_launch(joined_run, tmp_path):
    tmp, results = joined_run
    hub_out = results[1].stdout
    assert "mpifed: hub hub is waiting up to 60 s for edge at its door 127.0.0.1:" in hub_out
    assert "mpifed: facility edge joined (2 of 2)" in hub_out and "round   2/2" in hub_out
    assert "; links sealed (AES-256-GCM); " in hub_out  # the roots' exchange, under the token
    assert "mpifed: facility edge joined the federation" in results[0].stdout
    assert not (tmp / "port.txt").exists()  # the hub removes its rendezvous file once everyone is in
    digests = {(tmp / f"digest-{name}-{rank}.txt").read_text() for name, rank in (("hub", 0), ("hub", 1), ("edge", 0))}
    assert len(digests) == 1
    simulated = mpifed("simulate", "--config", str(tmp / "c.toml"), "--out", str(tmp_path / "sim"))
    assert simulated.returncode == 0, simulated.stderr
    assert "; links not sealed (no token given); " in simulated.stdout  # sealing changes no byte of the model
    assert _model(tmp / "run" / checkpoint.main_name(2)) == _model(tmp_path / "sim" / checkpoint.main_name(2))


@pytest.mark.slow
def test_three_separate_launches_equal_one_simulate_launch(tmp_path):
    config = _config(tmp_path, {"a": 1, "b": 1, "c": 1}, "facility.b.engine=deepspeed", "federation.outer=diloco")
    results = launch_all([(1, _worker(config, name, tmp_path), {"MPIFED_TOKEN": TOKEN}) for name in ("c", "a", "b")],
                      timeout=300)
    for r in results:
        assert r.returncode == 0, r.stderr
    assert len({(tmp_path / f"digest-{name}-0.txt").read_text() for name in "abc"}) == 1
    simulated = mpifed("simulate", "--config", str(config), "--out", str(tmp_path / "sim"))
    assert simulated.returncode == 0, simulated.stderr
    assert _model(tmp_path / "run" / checkpoint.main_name(2)) == _model(tmp_path / "sim" / checkpoint.main_name(2))


def test_a_wrong_token_is_refused_and_the_hub_stops_at_the_timeout(joined_run, tmp_path):
    """The hub resumes the finished run and waits 15 s for `edge`, which comes with a wrong token: it is
    refused at once, the hub stops at the timeout, and the checkpoint it resumed from is untouched."""
    shutil.copytree(joined_run[0] / "run", tmp_path / "run")
    config = _config(tmp_path, {"hub": 2, "edge": 1}, "facility.edge.engine=fsdp", "federation.rounds=4",
                     "federation.join_timeout_s=15")
    before = {p.name: p.read_bytes() for p in (tmp_path / "run").iterdir()}
    start = time.monotonic()
    hub, edge = launch_all([(2, _run(config, "hub") + ["--resume", "auto"], {"MPIFED_TOKEN": TOKEN}),
                         (1, _run(config, "edge") + ["--resume", "auto"], {"MPIFED_TOKEN": secrets.token_urlsafe(32)})], timeout=120)
    assert time.monotonic() - start < 90
    message = "the shared token differs (HMAC check failed)"
    # bad input a restart would repeat: exit 2, which the generated batch scripts do not resubmit
    assert edge.returncode == 2 and f"facility edge was refused by the hub: {message}" in edge.stderr
    assert hub.returncode != 0 and f"refused facility edge: {message}" in hub.stdout
    assert f"error: edge did not join within 15 s (federation.join_timeout_s); edge was refused: {message}" in hub.stderr
    assert {p.name: p.read_bytes() for p in (tmp_path / "run").iterdir()} == before


def test_a_different_model_is_refused_naming_the_fingerprint(tmp_path):
    config = _config(tmp_path, {"hub": 1, "edge": 1}, "federation.join_timeout_s=8")
    hub, edge = launch_all([(1, _run(config, "hub"), {"MPIFED_TOKEN": TOKEN}),
                         (1, _run(config, "edge") + ["--set", "lora.rank=2", "--set", "train.lr=0.5"],
                          {"MPIFED_TOKEN": TOKEN})], timeout=120)
    assert edge.returncode == 2
    for result in (edge, hub):
        assert result.returncode != 0
        assert "the flat-layout fingerprint differs (hub " in result.stdout + result.stderr
        # every differing key with both values (issue 33: it gave two digests)
        assert ("the configuration differs in lora.rank: hub '0', edge '2'; train.lr: hub '0.001', edge '0.5': "
                "use the same config file on every site") in result.stdout + result.stderr
    assert not (tmp_path / "run" / "latest").exists()


def test_a_mismatch_names_each_key_and_a_strangers_settings_are_bounded():
    from mpifed.comm.door import SHOWN_KEYS, Hello, bounded, differences

    hub = Hello("hub", 1, "fp", "d1", {"train.lr": "0.001", "train.seed": "0", "facility.b.ranks": "1"})
    new = {"facility": "b", "ranks": 1, "fingerprint": "fp", "config": "d2",
           "settings": {"train.lr": "0.002", "train.seed": "0", "facility.b.ranks": "1", "eval.every": "2"}}
    assert differences(hub, new, {"hub": 1, "b": 1}, {"hub"}) == [
        "the configuration differs in eval.every: hub '(unset)', b '2'; train.lr: hub '0.001', b '0.002': use the "
        "same config file on every site"]
    many = {**new, "settings": {f"k{i:03}": "x" * 100 for i in range(300)}}
    said = differences(hub, many, {"hub": 1, "b": 1}, {"hub"})[0]
    assert said.count("hub '") == SHOWN_KEYS and f"and {300 + 3 - SHOWN_KEYS} more" in said and "x" * 40 not in said
    for nonsense in ([1, 2], {"a": 1}, "text", None):  # an older version, or a stranger: the digests alone
        said = differences(hub, {**new, "settings": nonsense}, {"hub": 1, "b": 1}, {"hub"})[0]
        assert said.startswith("the configuration differs (digest hub d1, 'b' d2)")
    assert bounded({f"k{i}": "v" * 100 for i in range(200)}) == {} and bounded({"a": "1"}) == {"a": "1"}


def test_facilities_on_different_mpis_are_refused_at_the_door_naming_both():
    """Issue 33: Cray MPICH at one site and the MPICH wheel at another cannot share the MPI connection
    the join makes next, and nothing said so. The MPI library is in the hello, compared before anything
    of MPI is shown: one line naming both. (A second MPI is not installed here to launch for real.)"""
    from mpifed.comm.door import Hello, differences
    from mpifed.comm.join import mpi_library

    ours = mpi_library()
    assert ours.startswith("MPICH Version: ") and "\n" not in ours
    hub = Hello("hub", 1, "fp", "d1", {}, ours)
    same = {"facility": "b", "ranks": 1, "fingerprint": "fp", "config": "d1", "mpi": ours}
    assert differences(hub, same, {"hub": 1, "b": 1}, {"hub"}) == []
    for theirs, shown in [("Open MPI v5.0.7, package: Open MPI", "'Open MPI v5.0.7, package: Open MPI'"),
                          ("MPICH Version: 3.4a2 (Cray)", "'MPICH Version: 3.4a2 (Cray)'"), (None, "'(unset)'")]:
        said = differences(hub, {**same, "mpi": theirs} if theirs else {k: v for k, v in same.items() if k != "mpi"},
                           {"hub": 1, "b": 1}, {"hub"})
        assert said == [f"the MPI libraries differ (hub {ours!r}, 'b' {shown}): every site must run the same MPI "
                        "implementation and version (the site profile's [mpi] libmpi, or the mpich wheel on both)"]


def test_a_missing_facility_stops_the_hub_or_is_left_out(tmp_path):
    config = _config(tmp_path, {"a": 1, "b": 1, "c": 1}, "federation.join_timeout_s=8")
    start = time.monotonic()
    hub, = launch_all([(1, _run(config, "a"), {"MPIFED_TOKEN": TOKEN})], timeout=90)
    assert hub.returncode != 0 and time.monotonic() - start < 60
    assert ("error: b, c did not join within 8 s (federation.join_timeout_s); set federation.min_facilities to go "
            "on without them") in hub.stderr
    # with federation.min_facilities = 2, a and b go on without c
    config = _config(tmp_path, {"a": 1, "b": 1, "c": 1}, "federation.join_timeout_s=10", "federation.min_facilities=2")
    a, b = launch_all([(1, _run(config, "a"), {"MPIFED_TOKEN": TOKEN}), (1, _run(config, "b"), {"MPIFED_TOKEN": TOKEN})],
                   timeout=180)
    assert a.returncode == 0 and b.returncode == 0, a.stderr + b.stderr
    assert "going on without c: 2 facilities joined, federation.min_facilities = 2" in a.stdout
    assert checkpoint.verify(tmp_path / "run" / checkpoint.main_name(2)).facilities[-1]["name"] == "b"


def test_a_token_file_must_be_private(tmp_path):
    token = tmp_path / "token"
    token.write_text("secret\n")
    token.chmod(0o644)
    config = _config(tmp_path, {"hub": 1, "edge": 1}, f"federation.token_file={token}")
    env = {k: v for k, v in rank_env().items() if k != "MPIFED_TOKEN"}
    result = subprocess.run([MPIEXEC, "-n", "1", *_run(config, "hub")], capture_output=True, text=True, env=env,
                            timeout=120)
    assert result.returncode != 0
    assert f"federation.token_file {token}: mode 0644 lets others read it; chmod 600 {token}" in result.stderr


STALE_PORT = "tag#0$connentry#0200A1E27F000001$"  # the shape of an MPICH port name, of no live process


def test_a_facility_that_is_in_waits_as_long_as_the_hub_admits_others(tmp_path):
    """Staggered starts, as from three sites' queues, after a run whose hub was killed left its
    rendezvous file behind: b starts first, sees that the file is stale and waits for the hub; the hub
    starts 40 s later and rewrites it; c arrives 76 s after b, later than b's own join timeout plus every
    slack (60 + 10 + 5 s), yet within the hub's 60 s: b waits as long as the hub does and all three
    train."""
    join_timeout, timeout = 60, 5
    config = _config(tmp_path, {"a": 1, "b": 1, "c": 1}, f"federation.join_timeout_s={join_timeout}",
                     f"federation.timeout_s={timeout}", "federation.rounds=1")
    (tmp_path / "port.txt").write_text(f"{STALE_PORT}\nbeat 7\n")
    env = {"MPIFED_TOKEN": TOKEN}
    b, a, c = launch_all([(1, _run(config, "b"), env), (1, _run(config, "a"), env), (1, _run(config, "c"), env)],
                      timeout=240, starts=[0, 40, 76])
    from mpifed.comm.join import HANDSHAKE_S
    assert 76 > join_timeout + HANDSHAKE_S + timeout
    assert 40 + join_timeout - 76 >= 20  # room for c's own start (Python, MPI, handshake) on a busy machine
    for result in (a, b, c):
        assert result.returncode == 0, result.stdout + result.stderr
    assert f"{tmp_path / 'port.txt'} holds the port of a hub that is gone (not rewritten for 3 s); waiting" in b.stdout
    assert "facility b is in; the hub admits the others for up to" in b.stdout
    assert "facility c joined (3 of 3)" in a.stdout and "round   1/1" in a.stdout


def test_strangers_at_the_door_are_dropped_at_once_and_the_facility_behind_them_joins(tmp_path):
    """Ten strangers without the token reach the hub's door within half a second
    (tests/mpi/hostile_peer.py): two say nothing, one announces a 64 MiB message, two send random bytes
    (one unframed), two 15 KiB of '[' (which overflowed the JSON parser's recursion), two a well-formed
    hello with a made-up proof, one an admit. Each is dropped or refused with its line, none reaches MPI
    (MPICH's accept crashed with eight at once), and the real newcomer that comes after them joins."""
    config = _config(tmp_path, {"hub": 1, "edge": 1}, "federation.join_timeout_s=120", "federation.rounds=1")
    env = {"MPIFED_TOKEN": TOKEN}
    modes = ("silent", "silent", "big", "raw", "garbage", "nest", "nest", "hello", "hello", "admit")
    peers = [[sys.executable, str(WORKERS / "hostile_peer.py"), str(tmp_path / "port.txt"), mode] for mode in modes]
    start = time.monotonic()
    strangers = [subprocess.Popen(peer, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) for peer in peers]
    hub, edge = launch_all([(1, _run(config, "hub"), env), (1, _run(config, "edge"), env)], timeout=300,
                           starts=[0, 12])  # after the silent ones' 10 s: their drop is seen
    for stranger in strangers:
        stranger.wait(timeout=60)
    assert hub.returncode == 0 and edge.returncode == 0, hub.stdout + hub.stderr + edge.stderr
    assert hub.stdout.count("dropped a connection that said nothing within 10 s") == 2, hub.stdout
    assert "dropped a connection that sent a 67108864-byte message, more than a handshake may hold (16384)" \
        in hub.stdout, hub.stdout
    assert hub.stdout.count("more than a handshake may hold (16384)") == 2, hub.stdout  # and the unframed bytes
    no_hello = "dropped a connection that sent no valid hello (not an mpifed facility, or another version)"
    assert hub.stdout.count(no_hello) == 4, hub.stdout  # random bytes framed, the nesting twice, the admit
    assert hub.stdout.count("refused facility edge: the shared token differs (HMAC check failed)") == 2, hub.stdout
    assert "facility edge joined (2 of 2)" in hub.stdout and "round   1/1" in hub.stdout
    assert "Traceback" not in hub.stdout + hub.stderr
    assert time.monotonic() - start < 240


@pytest.mark.parametrize("mode", ["pass", "flip"])
def test_a_relay_at_the_door_sees_only_sealed_bytes_and_cannot_change_them(tmp_path, mode):
    """A man in the middle (tests/mpi/relay.py) sits between the newcomer and the hub's door, the newcomer
    given the relay's address with --port. Passing the bytes on, it sees the handshake and sealed frames
    only: neither the hub's MPI port nor the ticket is in its recording, and the newcomer joins and trains
    as without it. Flipping one bit of the sealed frame that carries the port ends the newcomer with one
    line naming the link, the hub gives it up and stops at its deadline, and nothing is written."""
    config = _config(tmp_path, {"hub": 1, "edge": 1}, "federation.rounds=1", "federation.join_timeout_s=45")
    env = {"MPIFED_TOKEN": TOKEN}
    relay = subprocess.Popen([sys.executable, str(WORKERS / "relay.py"), str(tmp_path / "port.txt"),
                              str(tmp_path / "relay.txt"), str(tmp_path / "seen.bin"), mode])
    try:
        while not (tmp_path / "relay.txt").exists():
            time.sleep(0.05)
        via = (tmp_path / "relay.txt").read_text().strip()
        hub, edge = launch_all([(1, _run(config, "hub"), env), (1, _run(config, "edge") + ["--port", via], env)],
                               timeout=200, starts=[0, 1])
    finally:
        relay.kill()
    seen = (tmp_path / "seen.bin").read_bytes()
    assert len(seen) > 500 and b"connentry" not in seen and b"tag#" not in seen and b"ticket" not in seen
    if mode == "pass":
        assert hub.returncode == 0 and edge.returncode == 0, hub.stdout + hub.stderr + edge.stderr
        assert "facility edge joined (2 of 2)" in hub.stdout
        assert checkpoint.verify(tmp_path / "run" / checkpoint.main_name(1)).round == 1
        return
    assert edge.returncode == 1 and (  # someone on the path, not the facility's input: a restart may do better
        "mpifed: rank 0: error: facility edge was refused by the hub: the hub sent a message that does not open "
        "(join link: tampered or not sealed under this link's key) during the handshake\n") in edge.stderr, edge.stderr
    assert "facility edge was admitted at the door but did not connect to the MPI port" in hub.stdout, hub.stdout
    assert hub.returncode != 0 and "edge did not join within 45 s" in hub.stderr
    assert not (tmp_path / "run").exists() or not list((tmp_path / "run").glob("*.h5"))


def test_a_rendezvous_file_left_by_a_hub_that_is_gone_is_one_line_and_exit_2(tmp_path):
    """No hub rewrites the file within the join timeout: the newcomer never connects to the dead port
    (MPICH crashes connecting to one) and says so in one line."""
    config = _config(tmp_path, {"hub": 1, "edge": 2}, "federation.join_timeout_s=6")
    (tmp_path / "port.txt").write_text(f"{STALE_PORT}\nbeat 3\n")
    start = time.monotonic()
    edge, = launch_all([(2, _run(config, "edge"), {"MPIFED_TOKEN": TOKEN})], timeout=90)
    assert edge.returncode == 2, edge.stdout + edge.stderr
    assert edge.stderr.strip() == (f"mpifed run: error: federation.rendezvous {tmp_path / 'port.txt'}: holds the port "
                                   "of a hub that is gone (the file was not rewritten within 6 s, "
                                   "federation.join_timeout_s); start the hub facility, which writes a new one, or "
                                   "remove the file")
    assert time.monotonic() - start < 60
    assert not (tmp_path / "run").exists() or not list((tmp_path / "run").iterdir())
