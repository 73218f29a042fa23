"""An emulated cluster for tests: nodes as network namespaces, each with its own address and, for the
processes started on it, its own host name (a UTS namespace); names resolve as on a cluster (`ip netns
exec` binds /etc/netns/NODE/hosts over /etc/hosts). MPICH's `mpiexec -hosts A,B -launcher ssh
-launcher-exec WRAPPER` starts ranks on the nodes: WRAPPER enters the node's namespaces instead of
sshing to it.

Nodes may be grouped into sites. Each site has its own bridge, and the sites' bridges meet through one
uplink per site that `tc` can shape (the wide-area link); and each site has a private filesystem: on its
nodes (a mount namespace each) /scratch is that site's own folder, so no site sees another's files.

    with Cluster(["a0", "a1", "b0"], sites={"A": ["a0", "a1"], "B": ["b0"]}, link="100mbit") as cluster:
        cluster.mpiexec(["a0", "a1"], [python, "-m", "mpifed", "run", "c.toml"], ...)

Needs root and `ip netns`; `unavailable()` says why not, for the tests to skip with that reason.
"""
from __future__ import annotations

import os
import shlex
import shutil
import struct
import subprocess
import sys
import tempfile
import time
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


SCRATCH = "/scratch"  # a site's private folder, as its nodes see it


class Cluster:
    """Nodes `names` (host names) as network namespaces, 10.79.0.(i+1)/24. `sites` groups them (site name
    -> nodes; a node in no site has no private /scratch); `link` shapes each site's uplink (a tc rate
    such as "100mbit", with a netem delay of `delay` where the kernel has netem)."""

    def __init__(self, names: list[str], sites: dict[str, list[str]] | None = None, link: str = "",
                 delay: str = "5ms") -> None:
        self.names = list(names)
        tag = os.getpid() % 10000
        self.namespaces = {name: f"mpf{tag}n{i}" for i, name in enumerate(self.names)}
        self.addresses = {name: f"{SUBNET}.{i + 1}" for i, name in enumerate(self.names)}
        self.bridge = f"mpf{tag}br"
        self.folder = Path(tempfile.mkdtemp(prefix="mpifed-cluster-"))
        self.sites = dict(sites or {})
        self.site_of = {node: site for site, nodes in self.sites.items() for node in nodes}
        self.link, self.delay, self.shaping = link, delay, "none"
        self.wrapper = self.folder / "enter-node.sh"
        self.enter = self.folder / "enter.sh"

    def scratch(self, site: str) -> Path:
        """Site `site`'s private /scratch, as this (the host's) filesystem sees it."""
        return self.folder / f"site-{site}"

    def __enter__(self) -> "Cluster":
        self.close()
        try:
            self._build()
        except BaseException:
            self.__exit__()
            raise
        return self

    def _build(self) -> None:
        _sh("ip", "netns", "add", self.bridge)
        bridges = {site: f"br{i}" for i, site in enumerate(["", *self.sites])}
        for site, bridge in bridges.items():
            self._in(self.bridge, "ip", "link", "add", bridge, "type", "bridge")
            self._in(self.bridge, "ip", "link", "set", bridge, "up")
        for i, site in enumerate(self.sites, start=1):  # site uplinks meet on br0, the wide area
            self.scratch(site).mkdir()
            self._in(self.bridge, "ip", "link", "add", f"up{i}", "type", "veth", "peer", "name", f"wan{i}")
            for end, bridge in ((f"up{i}", bridges[site]), (f"wan{i}", "br0")):
                self._in(self.bridge, "ip", "link", "set", end, "master", bridge)
                self._in(self.bridge, "ip", "link", "set", end, "up")
            if self.link:
                for end in (f"up{i}", f"wan{i}"):
                    self.shaping = self._shape(end)
        hosts = "127.0.0.1 localhost\n" + "".join(f"{a} {n}\n" for n, a in self.addresses.items())
        for i, name in enumerate(self.names):
            ns, up, down = self.namespaces[name], f"mpfu{i}x{os.getpid() % 1000}", f"mpfd{i}x{os.getpid() % 1000}"
            _sh("ip", "netns", "add", ns)
            _sh("ip", "link", "add", up, "type", "veth", "peer", "name", down)
            _sh("ip", "link", "set", up, "netns", ns)
            _sh("ip", "link", "set", down, "netns", self.bridge)
            self._in(self.bridge, "ip", "link", "set", down, "master", bridges[self.site_of.get(name, "")])
            self._in(self.bridge, "ip", "link", "set", down, "up")
            self._in(ns, "ip", "addr", "add", f"{self.addresses[name]}/24", "dev", up)
            self._in(ns, "ip", "link", "set", up, "up")
            self._in(ns, "ip", "link", "set", "lo", "up")
            Path(f"/etc/netns/{ns}").mkdir(parents=True, exist_ok=True)
            Path(f"/etc/netns/{ns}/hosts").write_text(hosts)
        if self.sites:
            Path(SCRATCH).mkdir(exist_ok=True)  # the mount point; each site's nodes bind their own folder on it
        # enter.sh NAME SCRATCH COMMAND, run inside a node's network, UTS and mount namespaces
        self.enter.write_text('#!/bin/sh\nhostname "$1"\n'
                              f'if [ -n "$2" ]; then mount --bind "$2" {SCRATCH} || exit 1; fi\n'
                              'exec sh -c "$3"\n')
        self.enter.chmod(0o755)
        # mpiexec calls WRAPPER [ssh options] HOST COMMAND: run COMMAND in HOST's namespaces under its name
        cases = "".join(f"  {name}|{self.addresses[name]}) set -- {self._entering(name)} \"$*\";;\n"
                        for name in self.names)
        self.wrapper.write_text(
            "#!/bin/sh\n"
            'while [ "${1#-}" != "$1" ]; do shift; done\n'
            "host=$1; shift\n"
            f"case $host in\n{cases}  *) echo \"no emulated node $host\" >&2; exit 1;;\nesac\n"
            'exec "$@"\n')
        self.wrapper.chmod(0o755)

    def _entering(self, node: str) -> str:
        """The words that run a command (the next argument) on `node`."""
        site = self.site_of.get(node)
        return (f"ip netns exec {self.namespaces[node]} unshare --uts --mount {self.enter} {node} "
                f"'{self.scratch(site) if site is not None else ''}'")

    def _shape(self, device: str) -> str:
        """Shape `device` in the bridge namespace: netem rate and delay, else tbf rate only."""
        netem = subprocess.run(["ip", "netns", "exec", self.bridge, "tc", "qdisc", "add", "dev", device, "root",
                                "netem", "delay", self.delay, "rate", self.link], capture_output=True)
        if netem.returncode == 0:
            return f"netem rate {self.link} delay {self.delay}"
        self._in(self.bridge, "tc", "qdisc", "add", "dev", device, "root", "tbf", "rate", self.link, "burst", "64kb",
                 "latency", "500ms")
        return f"tbf rate {self.link} (no netem in this kernel: no delay)"

    def run_on(self, node: str, command: list[str], **kwargs) -> subprocess.CompletedProcess:
        """Run `command` on `node` (its namespaces, its site's /scratch) and wait for it."""
        return subprocess.run(["sh", "-c", f'exec {self._entering(node)} "$*"', "sh", shlex.join(command)],
                              capture_output=True, text=True, **kwargs)

    def _in(self, ns: str, *args: str) -> None:
        _sh("ip", "netns", "exec", ns, *args)

    def mpiexec(self, hosts: list[str], program: list[str], env: dict[str, str], cwd: Path) -> subprocess.Popen:
        """One rank per node of `hosts`, launched from the first of them as a job script on it would. UCX
        is kept to TCP: the emulated nodes share one kernel, and UCX's shared-memory transports would
        carry their messages past the network the test means to use."""
        env = {**env, "UCX_TLS": env.get("UCX_TLS", "tcp,self")}
        launch = [MPIEXEC, "-hosts", ",".join(hosts), "-launcher", "ssh", "-launcher-exec", str(self.wrapper),
                  "-n", str(len(hosts)), *program]
        command = ["sh", "-c", f'exec {self._entering(hosts[0])} "$*"', "sh", shlex.join(launch)]
        return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                                cwd=cwd, start_new_session=True, stdin=subprocess.DEVNULL)

    def capture(self, device: str, into: Path) -> subprocess.Popen:
        """Start tcpdump on `device` of the bridge namespace (a node's port "mpfd<i>x..." via
        `port(node)`, or a site's uplink "wan<i>"), writing whole packets to `into`; `stop_capture` ends it."""
        proc = subprocess.Popen(["ip", "netns", "exec", self.bridge, "tcpdump", "-i", device, "-s", "0", "-U", "-n",
                                 "-w", str(into)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadline = 50
        while not into.exists() and deadline and proc.poll() is None:  # tcpdump makes the file once it listens
            deadline -= 1
            time.sleep(0.1)
        if not into.exists():
            proc.kill()
            raise RuntimeError(f"tcpdump on {device} did not start: {proc.communicate()[1].strip()}")
        return proc

    def port(self, node: str) -> str:
        """The bridge side of `node`'s link (all that node's traffic passes there)."""
        return f"mpfd{self.names.index(node)}x{os.getpid() % 1000}"

    def close(self) -> None:
        for ns in [*self.namespaces.values(), self.bridge]:
            _sh("ip", "netns", "del", ns, check=False)
            shutil.rmtree(f"/etc/netns/{ns}", ignore_errors=True)

    def __exit__(self, *exc: object) -> None:
        self.close()
        shutil.rmtree(self.folder, ignore_errors=True)


def stop_capture(proc: subprocess.Popen) -> str:
    """End a capture (tcpdump writes what it holds on SIGINT); its summary line ("N packets captured...")."""
    proc.send_signal(2)
    _, err = proc.communicate(timeout=30)
    return err


def tcp_streams(pcap: Path) -> dict[tuple, bytes]:
    """The TCP payload bytes of a capture, per direction of each connection ((src, sport, dst, dport)),
    in capture order: a 64-byte run of a message is found even where TCP cut it between two segments.
    Ethernet and IPv4 only (what the emulated nodes speak)."""
    data = pcap.read_bytes()
    streams: dict[tuple, bytearray] = {}
    at = 24  # the file's header
    while at + 16 <= len(data):
        caught = struct.unpack_from("<I", data, at + 8)[0]
        frame = data[at + 16:at + 16 + caught]
        at += 16 + caught
        if len(frame) < 34 or frame[12:14] != b"\x08\x00" or frame[23] != 6:  # IPv4 carrying TCP
            continue
        ihl = (frame[14] & 0x0F) * 4
        total = struct.unpack_from(">H", frame, 16)[0]
        tcp = 14 + ihl
        offset = (frame[tcp + 12] >> 4) * 4
        payload = frame[tcp + offset:14 + total]
        if payload:
            key = (frame[26:30], struct.unpack_from(">H", frame, tcp)[0], frame[30:34],
                   struct.unpack_from(">H", frame, tcp + 2)[0])
            streams.setdefault(key, bytearray()).extend(payload)
    return {key: bytes(value) for key, value in streams.items()}
