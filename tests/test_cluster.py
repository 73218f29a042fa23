"""Facilities that span several nodes, rehearsed on an emulated cluster (tests/cluster.py: network
namespaces with their own host names and addresses, ranks started by `mpiexec -hosts`): each facility's
torch store is found at its leader's address, and the result equals the same run on one host."""
import subprocess
import sys

import h5py
import pytest

from cluster import Cluster, unavailable
from conftest import MPIEXEC, rank_env
from mpifed import configfile

WHY_NOT = unavailable()
needs_nodes = pytest.mark.skipif(bool(WHY_NOT), reason=WHY_NOT or "emulated nodes are available")
TOKEN = "emulated cluster token"


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


@needs_nodes
def test_two_facilities_of_two_nodes_each_equal_one_simulate(tmp_path):
    """fsdp on nodes a0, a1 (the hub) and DeepSpeed ZeRO-3 on b0, b1, each its own launch joined over an
    MPI port, end with the model of the same configuration run as one `simulate` on one host."""
    config = _config(tmp_path)
    env = {**rank_env(), "MPIFED_TOKEN": TOKEN}
    program = [sys.executable, "-m", "mpifed", "run", str(config), "--facility"]
    with Cluster(["a0", "a1", "b0", "b1"]) as cluster:
        newcomer = cluster.mpiexec(["b0", "b1"], [*program, "b"], env, tmp_path)
        hub = cluster.mpiexec(["a0", "a1"], [*program, "a"], env, tmp_path)
        results = [_finish(hub, 540), _finish(newcomer, 60)]
    for result in results:
        assert result.returncode == 0, f"{result.stdout}\n{result.stderr}"
    assert "round   2/2" in results[0].stdout
    alone = subprocess.run([sys.executable, "-m", "mpifed", "simulate", "--config", str(config),
                            "--out", str(tmp_path / "one")], capture_output=True, text=True, env=rank_env(),
                           cwd=tmp_path, timeout=400)
    assert alone.returncode == 0, alone.stderr
    assert _models(tmp_path / "run" / "round_00002.h5") == _models(tmp_path / "one" / "round_00002.h5")


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
    assert result.returncode != 0
    assert "MPIFED_STORE_HOST=10.255.255.1: no usable address on node" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "run").exists() or not list((tmp_path / "run").glob("round_*"))
