"""What a facility listens on, seen by the kernel (tests/mpi/listen_worker.py reads each rank's own
listening sockets before and after the process group starts): the torch store on the one address the
leader picked, on a port of MPIFED_STORE_PORTS; gloo's listeners on that address too (loopback for a
facility on one node, the node's address across nodes); nothing torch adds listens on every interface.
A malformed range, or one whose ports are all taken, is one clear line."""
import json
import os
import socket
import subprocess
import sys

import pytest

from cluster import Cluster, unavailable
from conftest import MPIEXEC, WORKERS, mpiexec, rank_env
from mpifed.comm import topology

WHY_NOT = unavailable()
WILDCARDS = ("0.0.0.0:", "[::]:")


def _ports() -> tuple[int, int]:
    """Ten ports below the kernel's ephemeral range, apart for each test process (the code skips busy ones)."""
    low = 23000 + (os.getpid() % 500) * 10
    return low, low + 9


def _seen(out, n: int) -> list[dict]:
    return [json.loads((out / f"rank-{i}.json").read_text()) for i in range(n)]


def _check(seen: list[dict], addresses: list[str], ports: tuple[int, int]) -> None:
    """Rank i's new listeners are all on addresses[i]; the store is rank 0's, on addresses[0], in `ports`."""
    store_host, store_port = seen[0]["store"].rsplit(":", 1)
    assert store_host == addresses[0] and ports[0] <= int(store_port) <= ports[1], seen[0]
    for rank, (s, address) in enumerate(zip(seen, addresses)):
        assert s["sum"] == len(seen), s  # gloo worked
        added = sorted(set(s["after"]) - set(s["before"]))
        assert not [a for a in added if a.startswith(WILDCARDS)], f"rank {rank} listens on every interface: {added}"
        assert added and all(a.rsplit(":", 1)[0] == address for a in added), f"rank {rank}: {added}, not {address}"
        assert (seen[0]["store"] in added) == (rank == 0), f"rank {rank}: {added}"


def test_one_node_facility_listens_on_loopback_within_the_range(tmp_path, monkeypatch):
    ports = _ports()
    monkeypatch.setenv(topology.STORE_PORTS, f"{ports[0]}-{ports[1]}")
    monkeypatch.delenv(topology.STORE_HOST, raising=False)
    monkeypatch.delenv(topology.GLOO_INTERFACE, raising=False)
    mpiexec(2, "listen_worker.py", str(tmp_path), timeout=120)
    _check(_seen(tmp_path, 2), ["127.0.0.1", "127.0.0.1"], ports)


@pytest.mark.skipif(bool(WHY_NOT), reason=WHY_NOT or "emulated nodes are available")
@pytest.mark.parametrize("hosts", [["a0", "a1"], ["a0", "a0"]], ids=["two-nodes", "one-node"])
def test_emulated_nodes_listen_on_the_chosen_addresses_within_the_range(tmp_path, hosts):
    """Across nodes, the node's address (its name's); a facility on one node whose name resolves to its
    network address listens on loopback alone, gloo too."""
    ports = (29450, 29451)  # the nodes' own network namespaces: nothing else listens there
    env = {**rank_env(), topology.STORE_PORTS: f"{ports[0]}-{ports[1]}"}
    for setting in (topology.STORE_HOST, topology.GLOO_INTERFACE):
        env.pop(setting, None)
    with Cluster(["a0", "a1"]) as cluster:
        launch = cluster.mpiexec(hosts, [sys.executable, str(WORKERS / "listen_worker.py"), str(tmp_path)], env,
                                 tmp_path)
        try:
            out, err = launch.communicate(timeout=120)
        except subprocess.TimeoutExpired:
            launch.kill()
            out, err = launch.communicate()
        addresses = [cluster.addresses[host] for host in hosts] if hosts[0] != hosts[1] else ["127.0.0.1"] * 2
    assert launch.returncode == 0, f"{out}\n{err}"
    _check(_seen(tmp_path, 2), addresses, ports)


@pytest.mark.parametrize("value", ["29400", "29499-29400", "0-10", "1-65536", "low-high", "29400-", "29400-29401-2"])
def test_a_malformed_port_range_is_one_clear_error(monkeypatch, value):
    monkeypatch.setenv(topology.STORE_PORTS, value)
    with pytest.raises(topology.NetworkError) as raised:
        topology.listen_on("127.0.0.1")
    said = str(raised.value)
    assert "\n" not in said and said.startswith(f"MPIFED_STORE_PORTS={value}: not a port range on node "), said
    assert socket.gethostname() in said and raised.value.exit_code == 2


def _occupied() -> socket.socket:
    """A socket listening on a loopback port the OS picked."""
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    return taken


def test_the_store_skips_taken_ports_and_binds_one_address(monkeypatch):
    monkeypatch.delenv(topology.STORE_PORTS, raising=False)
    with topology.listen_on("127.0.0.1") as anywhere:  # unset: a port the OS picks, one address still
        assert anywhere.getsockname()[0] == "127.0.0.1" and anywhere.getsockname()[1] > 0
    with _occupied() as taken:
        port = taken.getsockname()[1]
        low, high = (port, port + 5) if port + 5 <= 65535 else (port - 5, port)
        monkeypatch.setenv(topology.STORE_PORTS, f"{low}-{high}")
        with topology.listen_on("127.0.0.1") as listener:
            host, got = listener.getsockname()
        assert host == "127.0.0.1" and low <= got <= high and got != port


def test_an_exhausted_range_is_one_clear_error(monkeypatch):
    with _occupied() as taken:
        port = taken.getsockname()[1]
        monkeypatch.setenv(topology.STORE_PORTS, f"{port}-{port}")
        with pytest.raises(topology.NetworkError) as raised:
            topology.listen_on("127.0.0.1")
    said = str(raised.value)
    assert "\n" not in said and said.startswith(f"MPIFED_STORE_PORTS={port}-{port}: every port of it is in use"), said
    assert socket.gethostname() in said and "widen the range" in said


def test_a_facility_whose_range_is_taken_exits_with_one_line(tmp_path):
    """Through `mpifed run`: the leader finds no free port, says so once, and the job exits 2 (bad input)."""
    config = tmp_path / "c.toml"
    config.write_text(f'[checkpoint]\ndir = "{tmp_path / "run"}"\n[[facility]]\nname = "a"\nranks = 2\n')
    with _occupied() as taken:
        port = taken.getsockname()[1]
        env = {**rank_env(), topology.STORE_PORTS: f"{port}-{port}"}
        env.pop(topology.STORE_HOST, None)
        result = subprocess.run([MPIEXEC, "-n", "2", sys.executable, "-m", "mpifed", "run", str(config)],
                                capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 2, result.stderr
    said = [line for line in result.stderr.splitlines() if line.startswith("mpifed")]
    assert len(said) == 1 and f"MPIFED_STORE_PORTS={port}-{port}: every port of it is in use on 127.0.0.1" in said[0], \
        result.stderr
    assert "Traceback" not in result.stderr
