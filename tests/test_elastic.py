"""Elastic federation, on separate launches (one mpiexec per facility, as on separate sites): a facility
asked to stop leaves after its round while the others go on without it, and one more leaving below
`federation.min_facilities` stops everyone cleanly with the round checkpointed. The rounds are checked
against an independent numpy computation of the outer rule over the facilities that took part."""
import json
import os
import re
import secrets
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

from conftest import MPIEXEC, WORKERS, mpifed, rank_env
from mpifed import STOPPED_EXIT
from mpifed.checkpoint import format as checkpoint
from test_join import TOKEN, _config


class Sites:
    """Separate launches of tests/mpi/leave_worker.py, as separate sites start them: `start` one (the hub
    first), and every line the hub prints goes to `on_hub_line(line, sites)`, which may signal or start
    others (every other launch's to `on_line(key, line, sites)`, where given); `wait` for all, killing
    them all at the timeout (a hang fails the test)."""

    def __init__(self, config: Path, out: Path, on_hub_line, on_line=None) -> None:
        self.config, self.out, self.on_hub_line, self.on_line = config, out, on_hub_line, on_line
        self.procs: dict[str, subprocess.Popen] = {}
        self.results: dict[str, subprocess.CompletedProcess] = {}
        self._readers: list[threading.Thread] = []

    def start(self, key: str, name: str, ranks: int, *args: str, token: str = TOKEN, config: Path | None = None
              ) -> None:
        """Launch facility `name` as `key` (args: the worker's RESUME), with another token or config."""
        proc = subprocess.Popen([MPIEXEC, "-n", str(ranks), sys.executable, str(WORKERS / "leave_worker.py"),
                                 str(config or self.config), name, str(self.out), *args], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, env={**rank_env(), "MPIFED_TOKEN": token},
                                start_new_session=True, stdin=subprocess.DEVNULL)
        hub = not self.procs
        self.procs[key] = proc
        reader = threading.Thread(target=self._read, args=(key, proc, hub), daemon=True)
        self._readers.append(reader)
        reader.start()

    def _read(self, key: str, proc: subprocess.Popen, hub: bool) -> None:
        lines = []
        for line in proc.stdout:
            lines.append(line)
            if hub:
                self.on_hub_line(line, self)
            elif self.on_line is not None:
                self.on_line(key, line, self)
        err = proc.stderr.read()
        proc.wait()
        self.results[key] = subprocess.CompletedProcess(proc.args, proc.returncode, "".join(lines), err)

    def ended(self, key: str) -> bool:
        return key in self.procs and self.procs[key].poll() is not None

    def signal(self, key: str) -> None:
        self.procs[key].send_signal(signal.SIGUSR1)  # mpiexec passes it on to the ranks

    def run(self, ranks: dict[str, int], timeout: float) -> dict[str, subprocess.CompletedProcess]:
        """Start every facility of `ranks` (name -> ranks, the hub first) under its own name and `wait`."""
        for name, n in ranks.items():
            self.start(name, name, n)
        return self.wait(timeout)

    def wait(self, timeout: float) -> dict[str, subprocess.CompletedProcess]:
        ends = time.monotonic() + timeout
        while time.monotonic() < ends and not all(self.ended(key) for key in self.procs):
            time.sleep(0.2)
        hung = [key for key in self.procs if not self.ended(key)]
        for key in hung:
            subprocess.run(["pkill", "-KILL", "-g", str(self.procs[key].pid)], check=False)
        for reader in self._readers:
            reader.join(10)
        assert not hung, f"{hung} still running after {timeout} s: {self.results}"
        return self.results


def _round(line: str) -> int | None:
    """The round number of a hub's round line (None for other lines)."""
    return int(line.split()[1].split("/")[0]) if line.startswith("round ") else None


def _round_or_entry(line: str, done: dict[str, int]) -> int | None:
    """`_round` of a hub's line; a line saying that a facility rejoined puts the round it entered after
    in `done["entered"]`."""
    if "rejoined after round" in line:
        done["entered"] = int(line.split("after round ")[1].split(";")[0])
    return _round(line)


def _rounds_of(out: Path, name: str) -> list[int]:
    """The rounds facility `name` trained (those its leader recorded a model before the exchange for)."""
    return sorted(int(p.name.split("-")[2].split(".")[0]) for p in out.glob(f"local-{name}-*.npy"))


def _check_rounds(out: Path, ranks: dict[str, int], last: int, steps: int, batch: int, seq: int,
                  ahead: dict[tuple[str, int], int] | None = None) -> None:
    """Every rank that took part in a round holds the same model after it, and that model is DiLoCo
    computed in numpy from the models of the facilities that trained the round, weighted by tokens
    (`ahead`: (facility, round) -> the steps it trained ahead, which that round's exchange counts)."""
    theta = np.load(out / "global-a-0-0.npy").astype(np.float64)
    momentum = np.zeros_like(theta)
    for round_ in range(1, last + 1):
        found = {f: out / f"local-{f}-{round_}.npy" for f in ranks}
        trained = {f: np.load(path) for f, path in found.items() if path.exists()}
        tokens = {f: ranks[f] * (steps + (ahead or {}).get((f, round_), 0)) * batch * seq for f in trained}
        models = [np.load(out / f"global-{f}-{r}-{round_}.npy") for f in trained for r in range(ranks[f])]
        assert all(m.tobytes() == models[0].tobytes() for m in models), round_
        theta, momentum = _diloco(theta, trained, tokens, momentum)
        np.testing.assert_allclose(models[0], theta, rtol=1e-5, atol=2e-6, err_msg=f"round {round_}")
        assert np.abs(models[0] - theta).max() < 1e-3 * np.abs(theta - trained["a"]).max()


def _diloco(theta: np.ndarray, locals_: dict[str, np.ndarray], tokens: dict[str, int], momentum: np.ndarray,
            lr: float = 0.7, mu: float = 0.9) -> tuple[np.ndarray, np.ndarray]:
    """One DiLoCo outer step in float64: Δ = θ − Σ w_f·θ_f (w ∝ tokens), m ← μm + Δ,
    θ ← θ − lr·(Δ + μm)."""
    total = sum(tokens[f] for f in locals_)
    mean = sum(locals_[f].astype(np.float64) * (tokens[f] / total) for f in sorted(locals_))
    delta = theta - mean
    momentum = mu * momentum + delta
    return theta - lr * (delta + mu * momentum), momentum


def test_a_facility_leaves_the_others_go_on_and_one_more_leaving_below_the_minimum_stops_all(tmp_path):
    """3 facilities, min_facilities = 2. SIGUSR1 to c's job once round 1 is out: c finishes its round,
    leaves and ends while a and b train on; SIGUSR1 to b's at the next round after c's job ended: a
    alone would be fewer than 2, so both stop after that round, checkpointed. Every round equals DiLoCo
    computed in numpy from the models of the facilities that took part, weighted by their tokens."""
    ranks = {"a": 1, "b": 2, "c": 1}
    steps, batch, seq, rounds = 6, 4, 64, 12
    config = _config(tmp_path, ranks, f"train.local_steps={steps}", f"train.micro_batch={batch}",
                     f"data.seq_len={seq}", f"federation.rounds={rounds}", "federation.outer=diloco",
                     "federation.min_facilities=2", "checkpoint.every=100")
    sent: dict[str, int] = {}

    def on_hub_line(line: str, sites: Sites) -> None:
        round_ = _round(line)
        if round_ is not None and "c" not in sent:
            sent["c"] = round_
            sites.signal("c")
        elif round_ is not None and "b" not in sent and sites.ended("c"):  # c's job is over, a and b train
            sent["b"] = round_
            sites.signal("b")

    results = Sites(config, tmp_path, on_hub_line).run(ranks, timeout=240)
    a, b, c = results["a"], results["b"], results["c"]
    assert c.returncode == STOPPED_EXIT, c.stdout + c.stderr + a.stdout + b.stdout
    assert a.returncode == STOPPED_EXIT and b.returncode == STOPPED_EXIT, a.stdout + a.stderr + b.stderr

    left, stopped = _rounds_of(tmp_path, "c")[-1], _rounds_of(tmp_path, "a")[-1]
    assert sent["c"] < left <= sent["b"] < stopped < rounds, (sent, left, stopped)  # c's job ended before b's signal
    assert f"mpifed: c (SIGUSR1) leaves after round {left} of {rounds}; a, b go on without it from round " \
           f"{left + 1} (federation.min_facilities = 2)" in a.stdout
    assert f"mpifed: facility c leaves after round {left} of {rounds}" in c.stdout
    assert f"mpifed: stopping after round {stopped} of {rounds}, as asked by b (SIGUSR1); fewer than " \
           f"federation.min_facilities = 2 would stay; round {stopped} is checkpointed" in a.stdout
    assert _rounds_of(tmp_path, "b") == list(range(1, stopped + 1))
    assert not (tmp_path / f"global-c-0-{left + 1}.npy").exists()
    _check_rounds(tmp_path, ranks, stopped, steps, batch, seq)

    # The stop's round is checkpointed for the two that stayed, and verifies.
    run = tmp_path / "run"
    assert (run / "latest").read_text().strip() == checkpoint.main_name(stopped)
    assert [f["name"] for f in checkpoint.verify(run / checkpoint.main_name(stopped)).facilities] == ["a", "b"]
    assert [f["name"] for f in checkpoint.verify(run / checkpoint.main_name(left)).facilities] == ["a", "b", "c"]
    verified = mpifed("ckpt", "verify", str(run))
    assert verified.returncode == 0, verified.stdout + verified.stderr


def _strangers(rendezvous: Path, started: list[subprocess.Popen]) -> None:
    """Strangers without the token at the port `rendezvous` names, 2 s apart (tests/mpi/hostile_peer.py)."""
    for mode in ("garbage", "nest", "hello"):
        started.append(subprocess.Popen([sys.executable, str(WORKERS / "hostile_peer.py"), str(rendezvous), mode],
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=rank_env(),
                                        start_new_session=True, stdin=subprocess.DEVNULL))
        time.sleep(2)


def test_a_facility_that_left_comes_back_and_ones_with_a_wrong_token_or_model_are_refused(tmp_path):
    """3 facilities, min_facilities = 2. c is signalled and leaves; while it is out, a launch of c with a wrong
    token, then one with another model, are refused at the hub's door, and so are three strangers (random
    bytes, deep nesting, a made-up proof), and a and b train on undisturbed (every round as the rule
    computes it); then c's next job (--resume auto) comes back at a round boundary, receives the global
    model and the outer state over MPI, takes its data position from its own part, and trains with the
    others until the hub is asked to stop (which stops everyone: the hub does not leave). Every round equals
    DiLoCo in numpy over the facilities that trained it."""
    ranks = {"a": 1, "b": 2, "c": 1}
    steps, batch, seq, rounds = 4, 4, 64, 400  # the run ends with the hub's stop, 3 rounds after c is back
    config = _config(tmp_path, ranks, f"train.local_steps={steps}", f"train.micro_batch={batch}",
                     f"data.seq_len={seq}", f"federation.rounds={rounds}", "federation.outer=diloco",
                     "federation.min_facilities=2")
    other = tmp_path / "other.toml"  # the same run, but another model
    other.write_text(config.read_text().replace('preset = "llama-tiny"', 'preset = "llama-small"'))
    done: dict[str, int] = {}
    strangers: list[subprocess.Popen] = []

    def on_hub_line(line: str, sites: Sites) -> None:
        round_ = _round_or_entry(line, done)
        if round_ is None:
            return
        if "c" not in done:
            done["c"] = round_
            sites.signal("c")
        elif "impostor" not in done and sites.ended("c"):
            done["impostor"] = round_
            sites.start("impostor", "c", 1, "auto", token=secrets.token_urlsafe(32))
        elif "other" not in done and sites.ended("impostor"):
            done["other"] = round_
            sites.start("other", "c", 1, "auto", config=other)
        elif "strangers" not in done and sites.ended("other"):  # at the door, one after another
            done["strangers"] = round_
            threading.Thread(target=_strangers, args=(tmp_path / "port.txt", strangers), daemon=True).start()
        elif "back" not in done and strangers and all(s.poll() is not None for s in strangers):
            done["back"] = round_
            sites.start("back", "c", 1, "auto")
        elif "entered" in done and round_ == done["entered"] + 3 and "stop" not in done:
            done["stop"] = round_
            sites.signal("a")

    results = Sites(config, tmp_path, on_hub_line).run(ranks, timeout=300)
    a, b, c, impostor, another, back = (results[key] for key in ("a", "b", "c", "impostor", "other", "back"))
    assert c.returncode == STOPPED_EXIT, c.stdout + c.stderr
    assert impostor.returncode != 0 and "facility c was refused by the hub: the shared token differs" in impostor.stderr
    assert another.returncode != 0 and "facility c was refused by the hub: the flat-layout fingerprint differs" \
        in another.stderr
    assert "refused facility c: the shared token differs" in a.stdout
    assert "refused facility c: the flat-layout fingerprint differs" in a.stdout
    # the strangers at the door: random bytes and deep nesting dropped, a made-up proof refused
    assert a.stdout.count("dropped a connection that sent no valid hello (not an mpifed facility") == 2, a.stdout
    assert "refused facility 'edge': the shared token differs" in a.stdout
    for result in (a, b, back):
        assert result.returncode == STOPPED_EXIT, result.stdout + result.stderr

    trained, stopped = _rounds_of(tmp_path, "c"), _rounds_of(tmp_path, "a")[-1]
    left, entered = next(r for r in trained if r + 1 not in trained), done["entered"]
    assert done["c"] < left < done["impostor"] <= done["back"] <= entered < stopped < rounds, (done, left, stopped)
    assert trained == [*range(1, left + 1), *range(entered + 1, stopped + 1)]
    assert _rounds_of(tmp_path, "a") == _rounds_of(tmp_path, "b") == list(range(1, stopped + 1))
    assert "facility c is back; it joins at the next round boundary" in a.stdout
    assert f"stopping after round {stopped} of {rounds}, as asked by a (SIGUSR1); the hub cannot leave" in a.stdout
    part = tmp_path / "run" / checkpoint.facility_name(left, "c")
    assert f"facility c rejoined the federation after round {entered}" in back.stdout
    assert f"facility c trains from round {entered + 1} on, from its data position in {part}" in back.stdout
    _check_rounds(tmp_path, ranks, stopped, steps, batch, seq)

    # c's data position went on from where its own part left it: one round of batches further.
    before, _ = checkpoint.read_part(part)
    after, _ = checkpoint.read_part(tmp_path / "run" / checkpoint.facility_name(entered + 1, "c"))
    assert after["ranks/data"].tolist() == [[before["ranks/data"][0][0], before["ranks/data"][0][1] + steps * batch]]
    final = checkpoint.verify(tmp_path / "run" / checkpoint.main_name(stopped))
    assert [f["name"] for f in final.facilities] == ["a", "b", "c"]


def test_a_facility_that_comes_back_mid_round_trains_ahead_and_its_steps_count_in_the_next_exchange(tmp_path):
    """3 facilities, min_facilities = 2; c has 2 ranks. c is signalled and leaves, keeping the global
    model of the round it left after in its part; its next job starts at once, while the hub holds the
    round after (tests/mpi/leave_worker.py: as a long round would be), so c finds that round still
    running. It trains ahead from the kept model (its ranks agreeing step by step over their own process
    group, no MPI) until it is admitted at the boundary; then it holds the new global model plus what it
    learned ahead, x = theta_new + (x_ahead - theta_kept) (checked in float64), and its first exchange
    weighs the steps trained ahead with the round's. Every round equals DiLoCo in numpy."""
    ranks = {"a": 1, "b": 1, "c": 2}
    steps, batch, seq, rounds = 4, 4, 64, 400
    config = _config(tmp_path, ranks, f"train.local_steps={steps}", f"train.micro_batch={batch}",
                     f"data.seq_len={seq}", f"federation.rounds={rounds}", "federation.outer=diloco",
                     "federation.min_facilities=2", "federation.timeout_s=90")
    hold = tmp_path / "hold"
    done: dict[str, int] = {}

    def on_hub_line(line: str, sites: Sites) -> None:
        round_ = _round_or_entry(line, done)
        if round_ is None:
            return
        if "c" not in done:
            done["c"] = round_
            hold.touch()  # the hub holds its next round without c until c's next job trains ahead
            sites.signal("c")
        elif "entered" in done and round_ == done["entered"] + 2 and "stop" not in done:
            done["stop"] = round_
            sites.signal("a")

    def on_line(key: str, line: str, sites: Sites) -> None:
        if key == "c" and "leaves after round" in line and "back" not in done:
            done["back"] = -1
            threading.Thread(target=lambda: (sites.procs["c"].wait(), sites.start("back", "c", 2, "auto")),
                             daemon=True).start()
        if key == "back" and "trains ahead from round" in line:
            hold.unlink()

    results = Sites(config, tmp_path, on_hub_line, on_line).run(ranks, timeout=300)
    a, b, c, back = (results[key] for key in ("a", "b", "c", "back"))
    for result in (a, b, c, back):
        assert result.returncode == STOPPED_EXIT, result.stdout + result.stderr
    trained, stopped, entered = _rounds_of(tmp_path, "c"), _rounds_of(tmp_path, "a")[-1], done["entered"]
    left = next(r for r in trained if r + 1 not in trained)
    assert entered == left + 1 and trained == [*range(1, left + 1), *range(entered + 1, stopped + 1)], (done, trained)
    said = re.search(rf"facility c trained (\d+) of {steps} steps ahead, from round {left}'s global model", back.stdout)
    assert said, back.stdout
    ahead = int(said.group(1))
    assert 1 <= ahead <= steps

    # What it learned ahead, put back on top of the global model it entered with.
    kept = np.load(tmp_path / f"global-a-0-{left}.npy").astype(np.float64)
    theta = np.load(tmp_path / f"global-a-0-{entered}.npy").astype(np.float64)
    for rank in range(2):
        learned = np.load(tmp_path / f"ahead-c-{rank}.npy").astype(np.float64) - kept
        assert np.abs(learned).max() > 0
        np.testing.assert_allclose(np.load(tmp_path / f"entered-c-{rank}.npy"), theta + learned, rtol=0, atol=1e-6)
    _check_rounds(tmp_path, ranks, stopped, steps, batch, seq, ahead={("c", entered + 1): ahead})

    # The hub's metrics: every round once (the newcomer, alone in its world while it waited, wrote none),
    # and the round c entered in counts its steps ahead.
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [row["round"] for row in rows] == list(range(1, stopped + 1))
    assert rows[entered]["tokens"] == (2 * steps + 2 * (steps + ahead)) * batch * seq
    assert not [line for line in back.stdout.splitlines() if line.startswith("round ")]

    # Its data position went on from its own part: the steps ahead, then a round.
    before, _ = checkpoint.read_part(tmp_path / "run" / checkpoint.facility_name(left, "c"))
    after, _ = checkpoint.read_part(tmp_path / "run" / checkpoint.facility_name(entered + 1, "c"))
    assert (after["ranks/data"][:, 1] - before["ranks/data"][:, 1]).tolist() == [(steps + ahead) * batch] * 2
    _, flat = checkpoint.read_part(tmp_path / "run" / checkpoint.facility_name(left, "c"))
    assert "global/model" in flat
    np.testing.assert_array_equal(checkpoint.read_range(tmp_path / "run" / checkpoint.facility_name(left, "c"),
                                                        "global/model", 0, kept.size), kept.astype(np.float32))


def test_the_threads_that_wait_in_an_accept_take_the_lowest_cpu_priority_and_leave_the_others_alone():
    """MPICH's accept polls a whole core while it waits: a newcomer's accept thread runs at
    nice 19 (mpifed/comm/rejoin.py), the thread that trains keeps its priority."""
    from mpifed.comm.rejoin import lowest_priority

    seen = {}

    def waits() -> None:
        lowest_priority(threading.get_native_id())
        seen["waits"] = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())

    before = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    thread = threading.Thread(target=waits)
    thread.start()
    thread.join()
    assert seen["waits"] == 19
    assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) == before < 19
