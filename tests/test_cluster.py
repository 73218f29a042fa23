"""Deployments rehearsed on an emulated cluster (tests/cluster.py: network namespaces with their own
host names and addresses, ranks started by `mpiexec -hosts`, sites with private filesystems and a shaped
link between them): facilities span several nodes, each facility's torch store is found at its leader's
address, no two sites share a filesystem, and the results equal the same run on one host."""
import json
import os
import random
import re
import secrets
import signal
import subprocess
import sys
import threading
import time

import h5py
import pytest

from cluster import SCRATCH, Cluster, stop_capture, tcp_streams, unavailable
from conftest import MPIEXEC, rank_env
from mpifed import configfile
from mpifed.checkpoint import format as checkpoint

WHY_NOT = unavailable()
needs_nodes = pytest.mark.skipif(bool(WHY_NOT), reason=WHY_NOT or "emulated nodes are available")
TOKEN = secrets.token_urlsafe(32)  # a fresh one per run, as `mpifed token` writes


FSDP_AND_ZERO3 = [{"name": "a", "ranks": 2, "engine": "fsdp"},
                  {"name": "b", "ranks": 2, "engine": "deepspeed", "deepspeed": {"zero_stage": 3}}]


def _config(tmp_path, facilities=FSDP_AND_ZERO3, *sets: str):
    base = ["data.seq_len=64", "train.local_steps=3", "train.micro_batch=4", "federation.rounds=2",
            f"federation.rendezvous={tmp_path / 'port.txt'}", f"checkpoint.dir={tmp_path / 'run'}",
            # room for DeepSpeed's first use in a new environment: it JIT-builds its CPU op (~100 s here)
            "federation.join_timeout_s=400", "federation.timeout_s=400"]
    cfg = configfile.from_dict(configfile.apply_sets({"facility": facilities}, base + list(sets)))
    (tmp_path / "c.toml").write_text(configfile.dump_toml(cfg))
    return tmp_path / "c.toml"


def _models(path):
    with h5py.File(path) as h5:
        return {name: h5["model"][name][()].tobytes() for name in h5["model"]}


def _finish(proc: subprocess.Popen, timeout: float) -> subprocess.CompletedProcess:
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        pytest.fail(f"still running after {timeout} s\n{out}\n{err}")
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def _chunks(path, per_file: int = 200) -> list[bytes]:
    """A sample of the 64-byte runs of a checkpoint's model (each parameter's fp32 bytes cut at every 64),
    leaving out runs of few distinct values (a norm's ones), which could turn up anywhere."""
    with h5py.File(path) as h5:
        runs = [raw[i:i + 64] for name in sorted(h5["model"]) for raw in [h5["model"][name][()].tobytes()]
                for i in range(0, len(raw) - 63, 64)]
    runs = [run for run in runs if len({run[i:i + 4] for i in range(0, 64, 4)}) >= 12]
    return random.Random(7).sample(runs, min(per_file, len(runs)))


@needs_nodes
def test_two_facilities_of_two_nodes_each_equal_one_simulate(tmp_path):
    """fsdp on nodes a0, a1 (the hub) and DeepSpeed ZeRO-3 on b0, b1, two sites on their own networks,
    each its own launch joined over an MPI port, end with the model of the same configuration run as one
    `simulate` on one host. A capture of the link between the sites (tcpdump on site a's uplink) holds
    none of 400 64-byte runs of the checkpointed models; one of node a1's link inside site a (where the
    facility's own traffic is not sealed) holds some: the search finds what is there."""
    config = _config(tmp_path)
    env = {**rank_env(), "MPIFED_TOKEN": TOKEN}
    program = [sys.executable, "-m", "mpifed", "run", str(config), "--facility"]
    wan, inside = tmp_path / "wan.pcap", tmp_path / "a1.pcap"
    with Cluster(["a0", "a1", "b0", "b1"], sites={"A": ["a0", "a1"], "B": ["b0", "b1"]}) as cluster:
        captures = [cluster.capture("wan1", wan), cluster.capture(cluster.port("a1"), inside)]
        try:
            newcomer = cluster.mpiexec(["b0", "b1"], [*program, "b"], env, tmp_path)
            hub = cluster.mpiexec(["a0", "a1"], [*program, "a"], env, tmp_path)
            results = [_finish(hub, 540), _finish(newcomer, 60)]
        finally:
            said = [stop_capture(capture) for capture in captures]
    for result in results:
        assert result.returncode == 0, f"{result.stdout}\n{result.stderr}"
    assert "round   2/2" in results[0].stdout and "links sealed (AES-256-GCM)" in results[0].stdout
    alone = subprocess.run([sys.executable, "-m", "mpifed", "simulate", "--config", str(config),
                            "--out", str(tmp_path / "one")], capture_output=True, text=True, env=rank_env(),
                           cwd=tmp_path, timeout=400)
    assert alone.returncode == 0, alone.stderr
    assert _models(tmp_path / "run" / "round_00002.h5") == _models(tmp_path / "one" / "round_00002.h5")
    runs = [*_chunks(tmp_path / "run" / "round_00001.h5"), *_chunks(tmp_path / "run" / "round_00002.h5")]
    between, within = tcp_streams(wan), tcp_streams(inside)
    counted = sum(json.loads(line)["bytes_inter"] for line in (tmp_path / "run" / "metrics.jsonl").open())
    assert sum(map(len, between.values())) > counted, said  # the exchange crossed the captured link
    assert [run for run in runs if any(run in stream for stream in between.values())] == []
    assert sum(any(run in stream for stream in within.values()) for run in runs) >= 20, said


@needs_nodes
def test_the_store_host_may_name_an_interface(tmp_path):
    """MPIFED_STORE_HOST names the interface whose address the other node must use."""
    config = _config(tmp_path, FSDP_AND_ZERO3[:1])  # facility a alone, in one launch
    with Cluster(["a0", "a1"]) as cluster:
        device = subprocess.run(["ip", "netns", "exec", cluster.namespaces["a0"], "ip", "-o", "-4", "addr"],
                                capture_output=True, text=True, check=True).stdout
        interface = next(line.split()[1] for line in device.splitlines() if cluster.addresses["a0"] in line)
        env = {**rank_env(), "MPIFED_STORE_HOST": interface}
        run = _finish(cluster.mpiexec(["a0", "a1"], [sys.executable, "-m", "mpifed", "run", str(config)], env,
                                      tmp_path), 300)
    assert run.returncode == 0, f"{run.stdout}\n{run.stderr}"
    assert "round   2/2" in run.stdout


def test_a_store_host_this_node_lacks_is_one_clear_error(tmp_path):
    config = tmp_path / "c.toml"
    config.write_text(f'[checkpoint]\ndir = "{tmp_path / "run"}"\n[[facility]]\nname = "a"\nranks = 2\n')
    result = subprocess.run([MPIEXEC, "-n", "2", sys.executable, "-m", "mpifed", "run", str(config)],
                            capture_output=True, text=True, env={**rank_env(), "MPIFED_STORE_HOST": "10.255.255.1"},
                            timeout=120)
    assert result.returncode == 2, result.stderr  # bad input
    said = [line for line in result.stderr.splitlines() if line.startswith("mpifed")]
    assert len(said) == 1 and "MPIFED_STORE_HOST=10.255.255.1: no usable address on node" in said[0], result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "run").exists() or not list((tmp_path / "run").glob("round_*"))


class Watched:
    """A launch whose output is read as it comes, so a test can act when a line appears."""

    def __init__(self, proc: subprocess.Popen) -> None:
        self.proc, self.out, self.err = proc, [], []
        self.readers = [threading.Thread(target=lambda: self.out.extend(proc.stdout), daemon=True),
                        threading.Thread(target=lambda: self.err.extend(proc.stderr), daemon=True)]
        for reader in self.readers:
            reader.start()

    def wait_for(self, pattern: str, timeout: float) -> re.Match:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = next((m for line in list(self.out) if (m := re.search(pattern, line))), None)
            if found:
                return found
            if self.proc.poll() is not None and not any(r.is_alive() for r in self.readers):
                break
            time.sleep(0.1)
        self.kill()
        pytest.fail(f"no line matching {pattern!r} within {timeout} s\n{''.join(self.out)}\n{''.join(self.err)}")

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()

    def finish(self, timeout: float) -> subprocess.CompletedProcess:
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            pytest.fail(f"still running after {timeout} s\n{''.join(self.out)}\n{''.join(self.err)}")
        for reader in self.readers:
            reader.join(5)
        return subprocess.CompletedProcess(self.proc.args, self.proc.returncode, "".join(self.out), "".join(self.err))


SITES = {"A": ["a0", "a1"], "B": ["b0"]}


def _two_sites(cluster: Cluster, config, env: dict[str, str], cwd, resume: bool = False) -> list[Watched]:
    """Facility a (the hub) on site A's two nodes, facility b on site B's node, each its own launch; b
    learns the hub's port from the hub's output, as an operator would pass it on (no shared file)."""
    extra = ["--resume", "auto"] if resume else []
    program = [sys.executable, "-m", "mpifed", "run", str(config), *extra, "--facility"]
    hub = Watched(cluster.mpiexec(SITES["A"], [*program, "a"], env, cwd))
    port = hub.wait_for(r"at its door (\S+)", 120).group(1)
    newcomer = Watched(cluster.mpiexec(SITES["B"], [*program, "b", "--port", port], env, cwd))
    return [hub, newcomer]


@needs_nodes
def test_sites_without_a_shared_filesystem_checkpoint_and_resume_each_their_own_part(tmp_path):
    """Site A (the hub, fsdp over two nodes) and site B each see only their own /scratch, over a shaped
    link. Killed after round 3, with B's part of the newest round lost too, both resume with --resume
    auto: they agree over MPI on the newest round whose every part verifies at its own site, and end
    with the model of a run that never stopped; `ckpt verify` works on the hub's folder alone."""
    facilities = [{"name": "a", "ranks": 2, "engine": "fsdp"}, {"name": "b", "ranks": 1}]
    config = _config(tmp_path, facilities, "federation.rounds=6", "federation.outer=diloco",
                     "federation.compress=int8", "federation.rendezvous=", f"checkpoint.dir={SCRATCH}/run",
                     "federation.join_timeout_s=120", "federation.timeout_s=120", "checkpoint.keep=3")
    env = {**rank_env(), "MPIFED_TOKEN": TOKEN}
    with Cluster([*SITES["A"], *SITES["B"]], sites=SITES, link="200mbit") as cluster:
        first = _two_sites(cluster, config, env, tmp_path)
        first[0].wait_for(r"round   3/6", 300)
        for launch in first:  # every site at once, mid-run
            launch.kill()
        a_run, b_run = cluster.scratch("A") / "run", cluster.scratch("B") / "run"
        assert {p.name for p in b_run.iterdir()} <= {p.name for p in b_run.glob("round_*.fac-b.h5")}, \
            "site B holds only its own parts"
        assert not list(a_run.glob("*.fac-b.h5")) and list(b_run.glob("*.fac-b.h5")), "each part stays at its site"
        newest = checkpoint.main_files(a_run)[-1]
        newest_round = int(newest.name[6:11])
        assert newest_round >= 3
        (b_run / checkpoint.facility_name(newest_round, "b")).unlink(missing_ok=True)  # lost at site B

        verify = cluster.run_on("a0", [sys.executable, "-m", "mpifed", "ckpt", "verify", f"{SCRATCH}/run"], env=env,
                                timeout=120)
        assert verify.returncode == 0, verify.stderr
        assert "kept at their sites: the parts of b" in verify.stdout

        second = _two_sites(cluster, config, env, tmp_path, resume=True)
        results = [second[0].finish(400), second[1].finish(60)]
        final = _models(a_run / "round_00006.h5") if (a_run / "round_00006.h5").exists() else None
    for result in results:
        assert result.returncode == 0, f"{result.stdout}\n{result.stderr}"
    hub = results[0].stdout
    assert f"skipping checkpoint {newest.name}: facility b:" in hub and "missing" in hub
    assert f"resuming from {SCRATCH}/run/round_{newest_round - 1:05d}.h5" in hub
    alone = subprocess.run([sys.executable, "-m", "mpifed", "simulate", "--config", str(config),
                            "--out", str(tmp_path / "one")], capture_output=True, text=True, env=rank_env(),
                           cwd=tmp_path, timeout=400)
    assert alone.returncode == 0, alone.stderr
    assert final == _models(tmp_path / "one" / "round_00006.h5")
