"""An emulated cluster for tests: nodes as network namespaces on one bridge, each with its own address
and, for the processes started on it, its own host name (a UTS namespace); names resolve as on a
cluster (`ip netns exec` binds /etc/netns/NODE/hosts over /etc/hosts). MPICH's `mpiexec -hosts A,B
-launcher ssh -launcher-exec WRAPPER` starts ranks on the nodes: WRAPPER enters the node's namespaces
instead of sshing to it.

    with Cluster(["a0", "a1"]) as cluster:
        cluster.mpiexec(["a0", "a1"], [python, "-m", "mpifed", "run", "c.toml"], ...)

Needs root and `ip netns`; `unavailable()` says why not, for the tests to skip with that reason.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

MPIEXEC = str(Path(sys.executable).parent / "mpiexec")
SUBNET = "10.79.0"


def _sh(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(args, capture_output=True, text=True, check=check)


def unavailable() -> str:
    """Why this machine cannot emulate nodes ("" when it can)."""
    if os.geteuid() != 0:
        return "emulated nodes need root (ip netns, veth)"
    if not shutil.which("ip") or not shutil.which("unshare"):
        return "emulated nodes need iproute2's ip and util-linux's unshare"
    probe = f"mpfprobe{os.getpid()}"
    made = _sh("ip", "netns", "add", probe, check=False)
    _sh("ip", "netns", "del", probe, check=False)
    return "" if made.returncode == 0 else f"ip netns add is not permitted here: {made.stderr.strip()}"


class Cluster:
    """Nodes `names` (host names) as network namespaces on one bridge, 10.79.0.(i+1)/24."""

    def __init__(self, names: list[str]) -> None:
        self.names = list(names)
        tag = os.getpid() % 10000
        self.namespaces = {name: f"mpf{tag}n{i}" for i, name in enumerate(self.names)}
        self.addresses = {name: f"{SUBNET}.{i + 1}" for i, name in enumerate(self.names)}
        self.bridge = f"mpf{tag}br"
        self.folder = Path(tempfile.mkdtemp(prefix="mpifed-cluster-"))
        self.wrapper = self.folder / "enter-node.sh"

    def __enter__(self) -> "Cluster":
        self.close()
        _sh("ip", "netns", "add", self.bridge)
        self._in(self.bridge, "ip", "link", "add", "br0", "type", "bridge")
        self._in(self.bridge, "ip", "link", "set", "br0", "up")
        hosts = "127.0.0.1 localhost\n" + "".join(f"{a} {n}\n" for n, a in self.addresses.items())
        for i, name in enumerate(self.names):
            ns, up, down = self.namespaces[name], f"mpfu{i}x{os.getpid() % 1000}", f"mpfd{i}x{os.getpid() % 1000}"
            _sh("ip", "netns", "add", ns)
            _sh("ip", "link", "add", up, "type", "veth", "peer", "name", down)
            _sh("ip", "link", "set", up, "netns", ns)
            _sh("ip", "link", "set", down, "netns", self.bridge)
            self._in(self.bridge, "ip", "link", "set", down, "master", "br0")
            self._in(self.bridge, "ip", "link", "set", down, "up")
            self._in(ns, "ip", "addr", "add", f"{self.addresses[name]}/24", "dev", up)
            self._in(ns, "ip", "link", "set", up, "up")
            self._in(ns, "ip", "link", "set", "lo", "up")
            Path(f"/etc/netns/{ns}").mkdir(parents=True, exist_ok=True)
            Path(f"/etc/netns/{ns}/hosts").write_text(hosts)
        # mpiexec calls WRAPPER [ssh options] HOST COMMAND: run COMMAND in HOST's namespaces under its name
        cases = "".join(f"  {name}|{self.addresses[name]}) ns={self.namespaces[name]}; name={name};;\n"
                        for name in self.names)
        self.wrapper.write_text(
            "#!/bin/sh\n"
            'while [ "${1#-}" != "$1" ]; do shift; done\n'
            "host=$1; shift\n"
            f"case $host in\n{cases}  *) echo \"no emulated node $host\" >&2; exit 1;;\nesac\n"
            'exec ip netns exec "$ns" unshare --uts sh -c "hostname $name; exec sh -c \\"\\$0\\"" "$*"\n')
        self.wrapper.chmod(0o755)
        return self

    def _in(self, ns: str, *args: str) -> None:
        _sh("ip", "netns", "exec", ns, *args)

    def mpiexec(self, hosts: list[str], program: list[str], env: dict[str, str], cwd: Path) -> subprocess.Popen:
        """One rank per node of `hosts`, launched from the first of them as a job script on it would."""
        launch = [MPIEXEC, "-hosts", ",".join(hosts), "-launcher", "ssh", "-launcher-exec", str(self.wrapper),
                  "-n", str(len(hosts)), *program]
        first = hosts[0]
        command = ["ip", "netns", "exec", self.namespaces[first], "unshare", "--uts", "sh", "-c",
                   f'hostname {first}; exec "$@"', "sh", *launch]
        return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                                cwd=cwd, start_new_session=True, stdin=subprocess.DEVNULL)

    def close(self) -> None:
        for ns in [*self.namespaces.values(), self.bridge]:
            _sh("ip", "netns", "del", ns, check=False)
            shutil.rmtree(f"/etc/netns/{ns}", ignore_errors=True)

    def __exit__(self, *exc: object) -> None:
        self.close()
        shutil.rmtree(self.folder, ignore_errors=True)
