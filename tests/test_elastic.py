"""Elastic federation, on separate launches (one mpiexec per facility, as on separate sites): a facility
asked to stop leaves after its round while the others go on without it, and one more leaving below
`federation.min_facilities` stops everyone cleanly with the round checkpointed. The rounds are checked
against an independent numpy computation of the outer rule over the facilities that took part."""
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


def _launch(config: Path, ranks: dict[str, int], out: Path, on_hub_line, timeout: float
            ) -> dict[str, subprocess.CompletedProcess]:
    """Start every facility's launch of tests/mpi/leave_worker.py (the hub first), call
    `on_hub_line(line, procs)` for every line the hub prints, and wait for all (killing them at
    `timeout`). """
    procs, results = {}, {}
    for name, n in ranks.items():
        procs[name] = subprocess.Popen([MPIEXEC, "-n", str(n), sys.executable, str(WORKERS / "leave_worker.py"),
                                        str(config), name, str(out)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                       text=True, env={**rank_env(), "MPIFED_TOKEN": TOKEN}, start_new_session=True,
                                       stdin=subprocess.DEVNULL)

    def wait(name: str) -> None:
        proc, lines = procs[name], []
        for line in proc.stdout:
            lines.append(line)
            if name == next(iter(ranks)):
                on_hub_line(line, procs)
        err = proc.stderr.read()
        proc.wait()
        results[name] = subprocess.CompletedProcess(proc.args, proc.returncode, "".join(lines), err)

    waiters = [threading.Thread(target=wait, args=(name,), daemon=True) for name in procs]
    for waiter in waiters:
        waiter.start()
    ends = time.monotonic() + timeout
    for waiter in waiters:
        waiter.join(max(0.0, ends - time.monotonic()))
    hung = [name for name, proc in procs.items() if proc.poll() is None]
    for name in hung:
        subprocess.run(["pkill", "-KILL", "-g", str(procs[name].pid)], check=False)
    assert not hung, f"{hung} still running after {timeout} s: {results}"
    return results


def _diloco(theta: np.ndarray, locals_: dict[str, np.ndarray], tokens: dict[str, int], momentum: np.ndarray,
            lr: float = 0.7, mu: float = 0.9) -> tuple[np.ndarray, np.ndarray]:
    """One DiLoCo outer step in float64: Δ = θ − Σ w_f·θ_f (w ∝ tokens), m ← μm + Δ, θ ← θ − lr·(Δ + μm)."""
    total = sum(tokens[f] for f in locals_)
    mean = sum(locals_[f].astype(np.float64) * (tokens[f] / total) for f in sorted(locals_))
    delta = theta - mean
    momentum = mu * momentum + delta
    return theta - lr * (delta + mu * momentum), momentum


def test_a_facility_leaves_the_others_go_on_and_one_more_leaving_below_the_minimum_stops_all(tmp_path):
    """3 facilities, min_facilities = 2. SIGUSR1 to c's job once round 1 is out: c finishes its round,
    leaves and ends while a and b train on; SIGUSR1 to b's once the next round is out: a alone would be
    fewer than 2, so both stop after that round, checkpointed. Every round equals DiLoCo computed in
    numpy from the models of the facilities that took part, weighted by their tokens."""
    ranks = {"a": 1, "b": 2, "c": 1}
    steps, batch, seq, rounds = 6, 4, 64, 8
    config = _config(tmp_path, ranks, f"train.local_steps={steps}", f"train.micro_batch={batch}",
                     f"data.seq_len={seq}", f"federation.rounds={rounds}", "federation.outer=diloco",
                     "federation.min_facilities=2", "checkpoint.every=100")
    sent: dict[str, int] = {}

    def on_hub_line(line: str, procs: dict[str, subprocess.Popen]) -> None:
        if not line.startswith("round "):
            return
        round_ = int(line.split()[1].split("/")[0])
        if "c" not in sent:
            sent["c"] = round_
            procs["c"].send_signal(signal.SIGUSR1)  # mpiexec passes it on to c's rank
        elif "b" not in sent and procs["c"].poll() is not None:  # c's job is over while a and b train
            sent["b"] = round_
            procs["b"].send_signal(signal.SIGUSR1)

    results = _launch(config, ranks, tmp_path, on_hub_line, timeout=240)
    a, b, c = results["a"], results["b"], results["c"]
    assert c.returncode == STOPPED_EXIT, c.stdout + c.stderr
    assert a.returncode == STOPPED_EXIT and b.returncode == STOPPED_EXIT, a.stdout + a.stderr + b.stderr

    left = max(int(p.name.split("-")[2].split(".")[0]) for p in tmp_path.glob("local-c-*.npy"))
    stopped = max(int(p.name.split("-")[2].split(".")[0]) for p in tmp_path.glob("local-a-*.npy"))
    assert sent["c"] < left <= sent["b"] < stopped < rounds, (sent, left, stopped)  # c's job ended before b's signal
    assert f"mpifed: c (SIGUSR1) leaves after round {left} of {rounds}; a, b go on without it from round " \
           f"{left + 1} (federation.min_facilities = 2)" in a.stdout
    assert f"mpifed: facility c leaves after round {left} of {rounds}" in c.stdout
    assert f"mpifed: stopping after round {stopped} of {rounds}, as asked by b (SIGUSR1); fewer than " \
           f"federation.min_facilities = 2 would stay; round {stopped} is checkpointed" in a.stdout

    # Every rank holds the same model after every round it took part in...
    holders = {f: [(f, r) for r in range(n)] for f, n in ranks.items()}
    for round_ in range(stopped + 1):
        present = ["a", "b"] + (["c"] if round_ <= left else [])
        models = [np.load(tmp_path / f"global-{f}-{r}-{round_}.npy") for f in present for f, r in holders[f]]
        assert all(m.tobytes() == models[0].tobytes() for m in models), round_
    assert not (tmp_path / f"global-c-0-{left + 1}.npy").exists()
    # ...and it is the outer rule over the facilities that trained that round, weighted by their tokens.
    tokens = {f: n * steps * batch * seq for f, n in ranks.items()}
    theta = np.load(tmp_path / "global-a-0-0.npy").astype(np.float64)
    momentum = np.zeros_like(theta)
    for round_ in range(1, stopped + 1):
        trained = {f: np.load(tmp_path / f"local-{f}-{round_}.npy") for f in ranks
                   if (tmp_path / f"local-{f}-{round_}.npy").exists()}
        assert sorted(trained) == (["a", "b", "c"] if round_ <= left else ["a", "b"]), round_
        theta, momentum = _diloco(theta, trained, tokens, momentum)
        got = np.load(tmp_path / f"global-a-0-{round_}.npy")
        np.testing.assert_allclose(got, theta, rtol=1e-5, atol=2e-6, err_msg=f"round {round_}")
        assert np.abs(got - theta).max() < 1e-3 * np.abs(theta - np.load(tmp_path / f"local-a-{round_}.npy")).max()

    # The stop's round is checkpointed for the two that stayed, and verifies.
    run = tmp_path / "run"
    assert (run / "latest").read_text().strip() == checkpoint.main_name(stopped)
    assert [f["name"] for f in checkpoint.verify(run / checkpoint.main_name(stopped)).facilities] == ["a", "b"]
    assert [f["name"] for f in checkpoint.verify(run / checkpoint.main_name(left)).facilities] == ["a", "b", "c"]
    verified = mpifed("ckpt", "verify", str(run))
    assert verified.returncode == 0, verified.stdout + verified.stderr
