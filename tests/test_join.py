"""Facilities launched separately (one mpiexec each, as on separate sites) join over MPI ports: the
result equals one `simulate` launch, and a wrong token, a different model or a missing facility each
end with the documented error, bounded by the join timeout, without touching the last checkpoint."""
import os
import shutil
import signal
import subprocess
import sys
import time

import h5py
import pytest

from conftest import MPIEXEC, WORKERS, mpifed, rank_env
from mpifed import configfile
from mpifed.checkpoint import format as checkpoint

TOKEN = "correct horse battery staple"


def _config(tmp_path, ranks: dict[str, int], *sets: str):
    base = ["data.seq_len=64", "train.local_steps=3", "train.micro_batch=4", "federation.rounds=2",
            f"federation.rendezvous={tmp_path / 'port.txt'}", "federation.join_timeout_s=60",
            f"checkpoint.dir={tmp_path / 'run'}"]
    data = {"facility": [{"name": name, "ranks": n} for name, n in ranks.items()]}
    cfg = configfile.from_dict(configfile.apply_sets(data, base + list(sets)))
    (tmp_path / "c.toml").write_text(configfile.dump_toml(cfg))
    return tmp_path / "c.toml"


def _launch(jobs: list[tuple[int, list[str], dict[str, str]]], timeout: float) -> list[subprocess.CompletedProcess]:
    """Start every job at once (ranks, arguments, extra environment); wait for all, killing them all at
    `timeout` (a hang fails the test)."""
    procs = []
    for ranks, args, env in jobs:
        command = [MPIEXEC, "-n", str(ranks), *args]
        procs.append((command, subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                                env={**rank_env(), **env}, start_new_session=True,
                                                stdin=subprocess.DEVNULL)))
        time.sleep(0.3)
    deadline, results = time.monotonic() + timeout, []
    for command, proc in procs:
        try:
            out, err = proc.communicate(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            for _, p in procs:
                os.killpg(p.pid, signal.SIGKILL)
            out, err = proc.communicate()
            pytest.fail(f"{' '.join(command)} still running after {timeout}s\n{out}\n{err}")
        results.append(subprocess.CompletedProcess(command, proc.returncode, out, err))
    return results


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
    results = _launch([(1, _worker(config, "edge", tmp), {"MPIFED_TOKEN": TOKEN}),
                       (2, _worker(config, "hub", tmp), {"MPIFED_TOKEN": TOKEN})], timeout=240)
    for r in results:
        assert r.returncode == 0, r.stderr
    return tmp, results


def test_two_separate_launches_equal_one_simulate_launch(joined_run, tmp_path):
    tmp, results = joined_run
    hub_out = results[1].stdout
    assert "mpifed: hub hub is waiting up to 60 s for edge on MPI port" in hub_out
    assert "mpifed: facility edge joined (2 of 2)" in hub_out and "round   2/2" in hub_out
    assert "mpifed: facility edge joined the federation" in results[0].stdout
    assert not (tmp / "port.txt").exists()  # the hub removes its rendezvous file once everyone is in
    digests = {(tmp / f"digest-{name}-{rank}.txt").read_text() for name, rank in (("hub", 0), ("hub", 1), ("edge", 0))}
    assert len(digests) == 1
    simulated = mpifed("simulate", "--config", str(tmp / "c.toml"), "--out", str(tmp_path / "sim"))
    assert simulated.returncode == 0, simulated.stderr
    assert _model(tmp / "run" / checkpoint.main_name(2)) == _model(tmp_path / "sim" / checkpoint.main_name(2))


@pytest.mark.slow
def test_three_separate_launches_equal_one_simulate_launch(tmp_path):
    config = _config(tmp_path, {"a": 1, "b": 1, "c": 1}, "facility.b.engine=deepspeed", "federation.outer=diloco")
    results = _launch([(1, _worker(config, name, tmp_path), {"MPIFED_TOKEN": TOKEN}) for name in ("c", "a", "b")],
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
    hub, edge = _launch([(2, _run(config, "hub") + ["--resume", "auto"], {"MPIFED_TOKEN": TOKEN}),
                         (1, _run(config, "edge") + ["--resume", "auto"], {"MPIFED_TOKEN": "guess"})], timeout=120)
    assert time.monotonic() - start < 90
    message = "the shared token differs (HMAC check failed)"
    assert edge.returncode != 0 and f"facility edge was refused by the hub: {message}" in edge.stderr
    assert hub.returncode != 0 and f"refused facility edge: {message}" in hub.stdout
    assert f"error: edge did not join within 15 s (federation.join_timeout_s); edge was refused: {message}" in hub.stderr
    assert {p.name: p.read_bytes() for p in (tmp_path / "run").iterdir()} == before


def test_a_different_model_is_refused_naming_the_fingerprint(tmp_path):
    config = _config(tmp_path, {"hub": 1, "edge": 1}, "federation.join_timeout_s=8")
    hub, edge = _launch([(1, _run(config, "hub"), {"MPIFED_TOKEN": TOKEN}),
                         (1, _run(config, "edge") + ["--set", "lora.rank=2"], {"MPIFED_TOKEN": TOKEN})], timeout=120)
    for result in (edge, hub):
        assert result.returncode != 0
        assert "the flat-layout fingerprint differs (hub " in result.stdout + result.stderr
        assert "the configuration differs" in result.stdout + result.stderr
    assert not (tmp_path / "run" / "latest").exists()


def test_a_missing_facility_stops_the_hub_or_is_left_out(tmp_path):
    config = _config(tmp_path, {"a": 1, "b": 1, "c": 1}, "federation.join_timeout_s=8")
    start = time.monotonic()
    hub, = _launch([(1, _run(config, "a"), {"MPIFED_TOKEN": TOKEN})], timeout=90)
    assert hub.returncode != 0 and time.monotonic() - start < 60
    assert ("error: b, c did not join within 8 s (federation.join_timeout_s); set federation.min_facilities to go "
            "on without them") in hub.stderr
    # with federation.min_facilities = 2, a and b go on without c
    config = _config(tmp_path, {"a": 1, "b": 1, "c": 1}, "federation.join_timeout_s=10", "federation.min_facilities=2")
    a, b = _launch([(1, _run(config, "a"), {"MPIFED_TOKEN": TOKEN}), (1, _run(config, "b"), {"MPIFED_TOKEN": TOKEN})],
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
