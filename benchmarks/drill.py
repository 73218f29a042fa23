"""The elastic drill: three facilities, each in its own network namespace behind a shaped uplink
(benchmarks/wan.py's emulated WAN) and with a filesystem of its own (a mount namespace binds the
site's folder on /scratch, its checkpoint.dir: no site sees another's parts, and a facility that comes
back gets the global model over MPI), launched separately and joined over MPI ports, run twice side
by side with the same configuration (federation.min_facilities = 2, a checkpoint every round):

- undisturbed: every facility trains every round;
- the drill: a scripted schedule. Every 3 rounds one facility other than the hub is asked to stop
  (SIGUSR1, as SLURM sends ahead of a walltime) and leaves, and its next job is started at once with
  `--resume auto`, as the generated batch scripts' successors are; it trains ahead from the global
  model it kept while it waits, and rejoins at the next round boundary (mpifed/run/elastic.py).
  Then one facility is SIGKILLed (a lost site). With federation.on_loss at its default the others stop
  at the deadline with the newest checkpoint intact, and every facility's next job resumes with
  `--resume auto` and finishes the run.

Reports:
- goodput: tokens in the model over what the undisturbed federation trains in the same wall time (its
  tokens per second). Measured up to the SIGKILL (against the undisturbed run up to the same round),
  and over the whole drill. On one machine a facility that is out leaves its cores to the others, so
  the others train faster meanwhile: tokens_vs_undisturbed, the tokens of the final model over the
  undisturbed run's, shows what the leaves cost without that.
- rejoin_s_vs_transfer: how long the federation paused at a rejoin's round boundary (the newcomer
  receives the global model, outer state and corpus over MPI), the median over the rejoins, against
  the time one fp32 model takes across the same shaped link (a TCP stream between two namespaces).
- val_loss_ratio: the drill's final validation loss over the undisturbed run's.
- steps_ahead (per pair): the steps each facility coming back trained ahead, of train.local_steps.
- lost_checkpoints: rounds whose checkpoint is missing at the end or does not verify: the hub's main
  file and its own part at its site, every other facility's part at that facility's site.

The pair runs `--pairs` times (default 2), one after the other; the ratios are the pairs' medians
(the machine is shared, and a pair's figures move with its load), the rejoins' pause the median over
all of them, and lost_checkpoints the sum.

    python benchmarks/drill.py [--rounds 14] [--local-steps 20] [--model llama-small] [--rate 100mbit] [--pairs 2]

Needs root (ip netns, veth, tc); elsewhere it prints why and a RESULT line with "skipped". The RESULT
keys: goodput (up to the kill), goodput_with_kill, rejoin_s_vs_transfer, val_loss_ratio,
lost_checkpoints, and each pair's figures under "pairs".
"""
from __future__ import annotations

import argparse
import json
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from wan import ROOT, Wan, ns, usable, workload  # noqa: E402  (the same emulated WAN)

sys.path.insert(0, str(ROOT))
NAMES = ("hub", "b", "c")
SCRATCH = "/scratch"
"""Where each site's launches see their own folder (a bind mount in their mount namespace)."""


class Drill:
    """One federated run of the three facilities, each launch watched: the hub's lines go to `on_line`,
    which may signal, kill or start launches."""

    def __init__(self, wan: Wan, work: Path, sets: list[str], on_line) -> None:
        from mpifed import configfile

        data = {"facility": [{"name": n, "ranks": 1} for n in NAMES]}
        cfg = configfile.from_dict(configfile.apply_sets(data, [
            f"federation.rendezvous={work / 'port.txt'}", "federation.join_timeout_s=120",  # the one shared path
            f"checkpoint.dir={SCRATCH}/run", "checkpoint.every=1", "eval.facilities=false",
            "federation.min_facilities=2", "federation.timeout_s=20",
            # Three sites on this machine's cores: each would take them all for its torch threads, and
            # OpenMP teams that outnumber the cores wait on each other's spinning (a third training
            # process ran 40 times slower beside two others). One thread each, as sites of their own.
            "train.threads=1", *sets]))
        self.config, self.wan, self.work, self.on_line = work / "c.toml", wan, work, on_line
        self.config.write_text(configfile.dump_toml(cfg))
        self.sites = {name: work / "sites" / name for name in NAMES}
        """Each site's own folder, its launches' /scratch."""
        for folder in self.sites.values():
            folder.mkdir(parents=True)
        Path(SCRATCH).mkdir(exist_ok=True)  # the mount point: each site's launches bind their own folder on it
        self.run_dir = self.sites["hub"] / "run"
        """The hub's checkpoint.dir, as this (the host's) filesystem sees it: main files, metrics."""
        self.procs: dict[str, subprocess.Popen] = {}
        self.lines: list[tuple[float, str]] = []
        """The hub's lines, with the seconds since the start."""
        self.others: list[str] = []
        """Every other launch's lines."""
        self.started = time.monotonic()
        self._threads: list[threading.Thread] = []

    def start(self, name: str, *args: str) -> None:
        command, env = self.wan.launch(NAMES.index(name), 1, self.config, name, *args)
        command = ["unshare", "--mount", "--propagation", "private", "sh", "-c",
                   'mount --bind "$1" "$2" && shift 2 && exec "$@"', "site", str(self.sites[name]), SCRATCH, *command]
        proc = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                start_new_session=True)
        self.procs[name] = proc
        thread = threading.Thread(target=self._read, args=(name, proc), daemon=True)
        self._threads.append(thread)
        thread.start()

    def _read(self, name: str, proc: subprocess.Popen) -> None:
        for line in proc.stdout:
            if name == "hub":
                self.lines.append((time.monotonic() - self.started, line))
                self.on_line(line, self)
            else:
                self.others.append(line)

    def start_all(self, *args: str) -> None:
        """Start every facility's launch, the hub first, a moment apart."""
        for name in NAMES:
            self.start(name, *args)
            time.sleep(0.3)

    def running(self, name: str) -> bool:
        return self.procs[name].poll() is None

    def wait(self, timeout: float) -> float:
        """Wait until every launch has ended (and nobody started another); the wall seconds."""
        ends = time.monotonic() + timeout
        while time.monotonic() < ends:
            if all(p.poll() is not None for p in self.procs.values()):
                time.sleep(1.0)  # a launch the last line started
                if all(p.poll() is not None for p in self.procs.values()):
                    return time.monotonic() - self.started
            time.sleep(0.2)
        for proc in self.procs.values():
            subprocess.run(["pkill", "-KILL", "-g", str(proc.pid)], check=False)
        raise RuntimeError(f"the drill did not end within {timeout} s:\n" + "".join(line for _, line in self.lines))

    def rows(self) -> list[dict]:
        return [json.loads(line) for line in (self.run_dir / "metrics.jsonl").read_text().splitlines()]


def _round(line: str) -> int | None:
    return int(line.split()[1].split("/")[0]) if line.startswith("round ") else None


class Schedule:
    """The drill's script, driven by the hub's round lines: a leave every `every` rounds (b, c, b, ...;
    one that falls due while the last leaver is not back yet comes at the first round line after it
    is), each leaver's next job started as soon as its launch ends, and a SIGKILL of c after round
    `kill`; once the others have stopped, every facility's next job resumes."""

    def __init__(self, every: int, kill: int) -> None:
        self.every, self.kill = every, kill
        self.due = list(range(every - 1, kill, every))
        """The rounds after whose line a leave is asked for."""
        self.leaves: list[tuple[str, int]] = []
        self.out: set[str] = set()  # left, and not back yet
        self.killed_at: float | None = None
        self.tokens_before_kill = 0
        self.kill_round = 0
        self._lock = threading.Lock()

    def __call__(self, line: str, drill: Drill) -> None:
        round_ = _round(line)
        back = re.match(r"mpifed: facility (\w+) rejoined after round", line)
        if back:
            self.out.discard(back.group(1))
        if round_ is None or self.out:
            return
        with self._lock:
            if round_ >= self.kill and self.killed_at is None:
                self.killed_at, self.kill_round = time.monotonic() - drill.started, round_
                self.tokens_before_kill = drill.rows()[-1]["tokens_total"]
                subprocess.run(["pkill", "-KILL", "-g", str(drill.procs["c"].pid)], check=False)
                threading.Thread(target=self._restart_all, args=(drill,), daemon=True).start()
            elif self.due and round_ >= self.due[0] and round_ < self.kill:
                name = "bc"[len(self.leaves) % 2]
                if drill.running(name):
                    self.due.pop(0)
                    self.leaves.append((name, round_))
                    self.out.add(name)
                    drill.procs[name].send_signal(signal.SIGUSR1)
                    threading.Thread(target=self._requeue, args=(drill, name), daemon=True).start()

    @staticmethod
    def _requeue(drill: Drill, name: str) -> None:
        drill.procs[name].wait()
        drill.start(name, "--resume", "auto")

    @staticmethod
    def _restart_all(drill: Drill) -> None:
        for name in NAMES:
            drill.procs[name].wait()
        drill.start_all("--resume", "auto")


def transfer_s(wan: Wan, nbytes: int) -> float:
    """Seconds for `nbytes` over the shaped link, namespace 2 to namespace 0, as one TCP stream."""
    port = 47001
    server = subprocess.Popen(["ip", "netns", "exec", wan.names[0], sys.executable, "-c", (
        "import socket,sys\n"
        f"s=socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); s.bind(('10.77.0.1', {port}))\n"
        "s.listen(1); c,_=s.accept(); n=0\n"
        "while True:\n"
        "    b=c.recv(1<<20)\n"
        "    if not b: break\n"
        "    n+=len(b)\n"
        "c.sendall(b'done'); print(n)\n")], stdout=subprocess.PIPE, text=True)
    time.sleep(0.5)
    client = ns(wan.names[2], sys.executable, "-c", (
        "import socket,time\n"
        f"c=socket.create_connection(('10.77.0.1', {port})); t=time.perf_counter()\n"
        f"c.sendall(bytes({nbytes})); c.shutdown(socket.SHUT_WR); c.recv(4); print(time.perf_counter()-t)\n"))
    server.wait(timeout=60)
    return float(client.stdout.strip())


def foreign_files(drill: Drill) -> int:
    """Files at the sites of b and c that are not their own parts (0: nothing crossed by a filesystem)."""
    return sum(1 for name in NAMES[1:] for path in (drill.sites[name] / "run").iterdir()
               if not re.fullmatch(rf"round_\d+\.fac-{name}\.h5", path.name))


def lost_checkpoints(drill: Drill, rounds: int) -> list[int]:
    """The rounds 1..rounds whose main file is missing or does not verify, with the hub's part at its
    site and every other facility's part, against the digest the main file recorded, at that one's."""
    from mpifed.checkpoint import format as checkpoint

    lost = []
    for round_ in range(1, rounds + 1):
        try:
            main = checkpoint.verify(drill.run_dir / checkpoint.main_name(round_), facilities="here")
            for name in main.elsewhere:
                checkpoint.check_part(drill.sites[name] / "run" / checkpoint.facility_name(round_, name),
                                      main.part_digests.get(name, ""), numel=main.layout.numel)
        except (checkpoint.CheckpointError, OSError):
            lost.append(round_)
    return lost


def one_pair(wan: Wan, tmp: Path, sets: list[str], args: argparse.Namespace, link: float) -> dict:
    """The undisturbed run, then the drill, side by side: this pair's figures."""
    calm = Drill(wan, tmp / "calm", sets, lambda line, drill: None)
    calm.start_all()
    calm_wall = calm.wait(1800)
    calm_rows = calm.rows()
    print(f"undisturbed: {args.rounds} rounds in {calm_wall:.1f} s, {calm_rows[-1]['tokens_total']:,} tokens, "
          f"final val_loss {calm_rows[-1]['val_loss']:.4f}", flush=True)

    schedule = Schedule(args.every, args.kill)
    drill = Drill(wan, tmp / "drill", sets, schedule)
    drill.start_all()
    wall = drill.wait(2400)
    rows = drill.rows()
    hub_out = "".join(line for _, line in drill.lines)
    pauses = [float(x) for x in re.findall(r"rejoined after round \d+; the round boundary took ([\d.]+) s", hub_out)]
    ahead = [int(x) for x in re.findall(r"trained (\d+) of \d+ steps ahead", "".join(drill.others))]
    rate = calm_rows[-1]["tokens_total"] / calm_wall
    # up to the kill: tokens per second against the undisturbed run's up to the same round's line
    calm_at = next(t for t, line in calm.lines if _round(line) == schedule.kill_round)
    calm_tokens = calm_rows[schedule.kill_round - 1]["tokens_total"]
    lost = lost_checkpoints(drill, args.rounds)
    print(f"drill: {len(schedule.leaves)} leaves ({', '.join(f'{n} after round {r}' for n, r in schedule.leaves)}), "
          f"{len(pauses)} rejoins (boundary {', '.join(f'{p:.2f}' for p in pauses)} s, steps trained ahead "
          f"{ahead}), c killed at {schedule.killed_at or 0:.0f} s; {wall:.1f} s in all", flush=True)
    return {
        "goodput": (schedule.tokens_before_kill / schedule.killed_at) / (calm_tokens / calm_at),
        "goodput_with_kill": rows[-1]["tokens_total"] / (rate * wall),
        # time aside: the share of the undisturbed run's facility-rounds the drill's model holds
        "tokens_vs_undisturbed": rows[-1]["tokens_total"] / calm_rows[-1]["tokens_total"],
        "rejoin_s": pauses, "steps_ahead": ahead,
        "val_loss_ratio": rows[-1]["val_loss"] / calm_rows[-1]["val_loss"],
        "lost_rounds": lost, "foreign_files_at_sites": foreign_files(drill), "leaves": schedule.leaves,
        "killed_after_s": round(schedule.killed_at or 0, 1), "wall_s": round(wall, 1),
        "undisturbed_wall_s": round(calm_wall, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=14)
    parser.add_argument("--local-steps", type=int, default=20)
    parser.add_argument("--model", default="llama-small")
    parser.add_argument("--rate", default="100mbit")
    parser.add_argument("--every", type=int, default=3, help="a leave and rejoin every this many rounds")
    parser.add_argument("--kill", type=int, default=11, help="SIGKILL facility c after this round's line")
    parser.add_argument("--pairs", type=int, default=2, help="undisturbed run and drill, side by side, this many "
                        "times; the ratios are the pairs' medians")
    args = parser.parse_args()
    if not usable("drill"):
        return
    sets = workload(args.model, args.rounds, args.local_steps)
    from mpifed import configfile
    from mpifed.data.corpus import shape
    from mpifed.model import planned_layout

    with Wan(len(NAMES)) as wan, tempfile.TemporaryDirectory() as tmp:
        shaping = wan.shape(args.rate, "20ms")
        cfg = configfile.from_dict(configfile.apply_sets({"facility": [{"name": n, "ranks": 1} for n in NAMES]}, sets))
        numel = planned_layout(cfg, *shape(cfg.data)).numel
        link = transfer_s(wan, 4 * numel)
        pairs = []
        for i in range(args.pairs):
            (Path(tmp) / str(i) / "calm").mkdir(parents=True)
            (Path(tmp) / str(i) / "drill").mkdir()
            pairs.append(one_pair(wan, Path(tmp) / str(i), sets, args, link))

        def median(key: str) -> float:
            return statistics.median(pair[key] for pair in pairs)

        pauses = [p for pair in pairs for p in pair["rejoin_s"]]
        lost = [r for pair in pairs for r in pair["lost_rounds"]]
        result = {
            "goodput": round(median("goodput"), 3),
            "goodput_with_kill": round(median("goodput_with_kill"), 3),
            "tokens_vs_undisturbed": round(median("tokens_vs_undisturbed"), 3),
            "rejoin_s_vs_transfer": round(statistics.median(pauses) / link, 2) if pauses else None,
            "val_loss_ratio": round(median("val_loss_ratio"), 4),
            "lost_checkpoints": len(lost),
            "foreign_files_at_sites": sum(pair["foreign_files_at_sites"] for pair in pairs),
            "transfer_s": round(link, 3), "model_mb": round(4 * numel / 1e6, 1),
            "pairs": [{key: round(value, 4) if isinstance(value, float) else value for key, value in pair.items()}
                      for pair in pairs],
            "rounds": args.rounds, "local_steps": args.local_steps, "model": args.model, "shaping": shaping,
        }
        print("RESULT " + json.dumps(result))


if __name__ == "__main__":
    main()
