"""Emulated wide-area network: every facility in its own network namespace, joined through a bridge by a
veth pair whose uplink `tc` shapes (rate, and delay where the kernel has netem), each facility launched
separately (`mpifed run --facility`) and joined over MPI ports as on real sites.

For 2 and 3 facilities, the same run unshaped (blocking fp32), and shaped: blocking fp32, blocking int8,
delayed (federation.overlap) fp32 and delayed int4, each exchange landing a whole round after its post,
and delayed int4 landing 3 inner steps after it (federation.overlap_steps = 3). Reports per steady
round (all but the first, which sets up the connections, and the last, where overlap takes the run's
final exchange blocking): sync seconds (the time training waited for the exchange and for the other
facility), compute utilization (the share of wall time not spent waiting), and the bytes
between facilities as mpifed counts them (bytes_inter) against the bytes `tc` saw leave the uplinks over
the same rounds (the counters are read when round 1's line appears and at the end: start-up, the join
and the initial model are left out; TCP/IP headers and the control messages are in).

    python benchmarks/wan.py [--facilities 2,3] [--rate 100mbit] [--delay 20ms] [--model llama-small]
                             [--rounds 6] [--local-steps 10]

Needs root (ip netns, veth, tc); elsewhere it prints why and a RESULT line with "skipped". The RESULT
keys: utilization_blocking, utilization_delayed, utilization_delayed_int4 and
utilization_delayed_int4_tau3 (the worse facility count), and link_bytes_vs_counted (tc's bytes over
mpifed's, the largest deviation from 1 of any case).
"""
from __future__ import annotations

import argparse
import json
import os
import secrets
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PREFIX = "mpifedwan"

TOKEN = secrets.token_urlsafe(32)  # the federation's token for this run, as `mpifed token` writes


def sh(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(args, capture_output=True, text=True, check=check)


def ns(name: str, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    return sh("ip", "netns", "exec", name, *args, check=check)


class Wan:
    """A bridge namespace and one namespace per facility, 10.77.0.(i+1)/24 on uplink u{i}."""

    def __init__(self, facilities: int) -> None:
        self.names = [f"{PREFIX}{i}" for i in range(facilities)]
        self.bridge = f"{PREFIX}br"

    def __enter__(self) -> "Wan":
        self.close()
        sh("ip", "netns", "add", self.bridge)
        ns(self.bridge, "ip", "link", "add", "br0", "type", "bridge")
        ns(self.bridge, "ip", "link", "set", "br0", "up")
        for i, name in enumerate(self.names):
            sh("ip", "netns", "add", name)
            sh("ip", "link", "add", f"u{i}", "type", "veth", "peer", "name", f"b{i}")
            sh("ip", "link", "set", f"u{i}", "netns", name)
            sh("ip", "link", "set", f"b{i}", "netns", self.bridge)
            ns(self.bridge, "ip", "link", "set", f"b{i}", "master", "br0")
            ns(self.bridge, "ip", "link", "set", f"b{i}", "up")
            ns(name, "ip", "addr", "add", f"10.77.0.{i + 1}/24", "dev", f"u{i}")
            ns(name, "ip", "link", "set", f"u{i}", "up")
            ns(name, "ip", "link", "set", "lo", "up")
        return self

    def shape(self, rate: str, delay: str) -> str:
        """Shape every uplink; returns what was applied (netem for rate and delay, else tbf for rate only)."""
        applied = ""
        for i, name in enumerate(self.names):
            ns(name, "tc", "qdisc", "del", "dev", f"u{i}", "root", check=False)
            if not rate:
                continue
            netem = ns(name, "tc", "qdisc", "add", "dev", f"u{i}", "root", "netem", "delay", delay, "rate", rate,
                       check=False)
            if netem.returncode == 0:
                applied = f"netem rate {rate} delay {delay}"
            else:
                ns(name, "tc", "qdisc", "add", "dev", f"u{i}", "root", "tbf", "rate", rate, "burst", "64kb",
                   "latency", "500ms")
                applied = f"tbf rate {rate} (no delay: this kernel has no netem qdisc)"
        return applied or "none"

    def launch(self, i: int, ranks: int, config: Path, name: str, *args: str) -> tuple[list[str], dict[str, str]]:
        """The command and environment of facility `name`'s own launch (`mpifed run --facility`, `args`
        after it) inside namespace i."""
        python = sys.executable
        # UCX (the MPICH wheel's netmod) would use shared memory between jobs on one machine: TCP only,
        # over the facility's uplink, so every byte between facilities crosses the shaped link. The hub's
        # door listens on the uplink too (the namespace's host name resolves to loopback).
        env = {**os.environ, "MPIFED_TOKEN": TOKEN, "UCX_TLS": "tcp,self", "UCX_NET_DEVICES": f"u{i}",
               "MPIFED_GATEWAY_HOST": f"u{i}",
               "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
        command = ["ip", "netns", "exec", self.names[i], str(Path(python).parent / "mpiexec"), "-n", str(ranks), python,
                   "-m", "mpifed", "run", str(config), "--facility", name, *args]
        return command, env

    def sent_bytes(self) -> int:
        total = 0
        for i, name in enumerate(self.names):
            stats = ns(name, "ip", "-s", "-j", "link", "show", f"u{i}").stdout
            total += json.loads(stats)[0]["stats64"]["tx"]["bytes"]
        return total

    def close(self) -> None:
        for name in [*getattr(self, "names", []), getattr(self, "bridge", "")]:
            if name:
                sh("ip", "netns", "del", name, check=False)

    def __exit__(self, *exc) -> None:
        self.close()


def permitted() -> str:
    """Why namespaces cannot be used here ("" when they can)."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    for tool in ("ip", "tc"):
        if sh("which", tool, check=False).returncode != 0:
            return f"{tool} is not installed (iproute2)"
    probe = sh("ip", "netns", "add", f"{PREFIX}probe", check=False)
    sh("ip", "netns", "del", f"{PREFIX}probe", check=False)
    return "" if probe.returncode == 0 else f"ip netns add failed: {probe.stderr.strip()}"


def usable(benchmark: str) -> bool:
    """Whether namespaces can be used here; where not, print why and a RESULT line that says so."""
    why = permitted()
    if why:
        print(f"{benchmark}: skipped: {why}")
        print("RESULT " + json.dumps({"skipped": why}))
    return not why


def workload(model: str, rounds: int, local_steps: int) -> list[str]:
    """The settings of the runs these benchmarks time: `rounds` x `local_steps` of 4 x 128 tokens."""
    return [f"model.preset={model}", f"federation.rounds={rounds}", f"train.local_steps={local_steps}",
            "train.micro_batch=4", "data.seq_len=128"]


def run_federation(wan: Wan, work: Path, sets: list[str], ranks: int, timeout: float = 900) -> tuple[list[dict], int]:
    """One federated run, facility i launched in namespace i; returns the hub's metrics rows and the
    bytes that left the uplinks from the end of round 1 to the end of the run."""
    from mpifed import configfile

    names = [f"site{i}" for i in range(len(wan.names))]
    data = {"facility": [{"name": n, "ranks": ranks} for n in names]}
    cfg = configfile.from_dict(configfile.apply_sets(data, [
        f"federation.rendezvous={work / 'port.txt'}", "federation.join_timeout_s=120", f"checkpoint.dir={work / 'run'}",
        "checkpoint.every=1000", "eval.facilities=false", *sets]))
    (work / "c.toml").write_text(configfile.dump_toml(cfg))
    procs = []
    for i, name in enumerate(names):
        command, env = wan.launch(i, ranks, work / "c.toml", name)
        procs.append(subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
        time.sleep(0.3)
    metrics, after_first = work / "run" / "metrics.jsonl", None
    ends = time.monotonic() + timeout
    while any(p.poll() is None for p in procs) and time.monotonic() < ends:
        if after_first is None and metrics.exists() and metrics.read_text().count("\n") >= 1:
            after_first = wan.sent_bytes()
        time.sleep(0.05)
    outputs = [p.communicate(timeout=max(1.0, ends - time.monotonic()))[0] for p in procs]
    if any(p.returncode for p in procs) or after_first is None:
        raise RuntimeError("a facility failed:\n" + "\n".join(outputs))
    return [json.loads(line) for line in metrics.read_text().splitlines()], wan.sent_bytes() - after_first


def summarise(rows: list[dict], link: int, link_rounds: int) -> dict:
    # round 1 includes the first connections' setup; with overlap the last one takes the final exchange
    # blocking (once per run, not per round): the steady rounds are those in between
    steady = rows[1:-1] if len(rows) > 2 else rows
    wall = sum(r["wall_s"] for r in steady)
    sync = sum(r["sync_s"] + r["idle_s"] for r in steady)
    counted = sum(r["bytes_inter"] for r in rows[-link_rounds:])  # the rounds the link counters spanned
    return {"sync_s": round(sync / len(steady), 3), "utilization": round(1 - sync / wall, 3),
            "bytes_inter_per_round": counted // link_rounds, "link_bytes_per_round": link // link_rounds,
            "link_vs_counted": round(link / counted, 3) if counted else None,
            "wall_s_per_round": round(wall / len(steady), 3), "final_val_loss": rows[-1]["val_loss"]}


CASES = {
    "unshaped": (False, []),
    "blocking": (True, []),
    "blocking_int8": (True, ["federation.compress=int8"]),
    "delayed": (True, ["federation.overlap=delayed"]),
    "delayed_int4": (True, ["federation.overlap=delayed", "federation.compress=int4"]),
    "delayed_int4_tau3": (True, ["federation.overlap=delayed", "federation.overlap_steps=3",
                                 "federation.compress=int4"]),
}


def measure(facilities: int, ranks: int, rate: str, delay: str, sets: list[str], say=print) -> dict:
    out = {}
    with Wan(facilities) as wan, tempfile.TemporaryDirectory() as tmp:
        for label, (shaped, extra) in CASES.items():
            applied = wan.shape(rate if shaped else "", delay)
            work = Path(tmp) / label
            work.mkdir()
            rows, link = run_federation(wan, work, sets + extra, ranks)
            out[label] = {**summarise(rows, link, len(rows) - 1), "shaping": applied}
            r = out[label]
            say(f"{facilities} fac {label:<14} sync {r['sync_s']:6.3f} s/round  utilization {r['utilization']:6.1%}  "
                f"bytes/round {r['bytes_inter_per_round']:>12,} counted, {r['link_bytes_per_round']:>12,} on the link "
                f"({r['link_vs_counted']}x)  final val_loss {r['final_val_loss']:.4f}  [{applied}]", flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--facilities", default="2,3")
    parser.add_argument("--ranks", type=int, default=1, help="ranks per facility")
    parser.add_argument("--rate", default="100mbit")
    parser.add_argument("--delay", default="20ms")
    parser.add_argument("--model", default="llama-small")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--local-steps", type=int, default=10)
    args = parser.parse_args()
    if not usable("wan"):
        return
    sets = workload(args.model, args.rounds, args.local_steps)
    counts = [int(f) for f in args.facilities.split(",")]
    runs = {count: measure(count, args.ranks, args.rate, args.delay, sets) for count in counts}
    worst = lambda label: min(runs[c][label]["utilization"] for c in counts)  # noqa: E731
    deviation = max((abs(r["link_vs_counted"] - 1), r["link_vs_counted"]) for out in runs.values()
                    for label, r in out.items() if r["link_vs_counted"] is not None)[1]
    result = {
        "facilities": counts, "model": args.model, "rate": args.rate, "delay": args.delay,
        "shaping": runs[counts[0]]["blocking"]["shaping"],
        "utilization_unshaped": worst("unshaped"), "utilization_blocking": worst("blocking"),
        "utilization_blocking_int8": worst("blocking_int8"), "utilization_delayed": worst("delayed"),
        "utilization_delayed_int4": worst("delayed_int4"), "utilization_delayed_int4_tau3": worst("delayed_int4_tau3"),
        "utilization_delayed_int4_by_facilities": {c: runs[c]["delayed_int4"]["utilization"] for c in counts},
        "link_bytes_vs_counted": deviation,
        "runs": {str(c): {label: {k: v for k, v in r.items() if k != "shaping"} for label, r in out.items()}
                 for c, out in runs.items()},
    }
    print("RESULT " + json.dumps(result))


if __name__ == "__main__":
    main()
