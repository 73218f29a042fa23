"""End to end under real mpiexec: models identical on every rank and in the checkpoint, the issue's
acceptance command, and validation loss falling on the embedded text."""
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest

from conftest import MPIEXEC, mpiexec, mpifed, rank_env, run
from mpifed import STOPPED_EXIT, configfile
from mpifed.checkpoint import format as checkpoint
from mpifed.data.corpus import VOCAB_SIZE
from mpifed.model import build_model

KEYS = {"round", "train_loss", "val_loss", "tokens", "inner_s", "sync_s", "ckpt_s", "bytes_inter"}


def _metrics(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.slow
def test_every_rank_holds_the_checkpointed_model_bit_for_bit(tmp_path):
    cfg = configfile.from_dict(configfile.apply_sets({}, [
        "facility.f0.ranks=1", "facility.f1.ranks=3", "train.local_steps=3", "federation.rounds=2",
        "train.micro_batch=4", "data.seq_len=64", f"checkpoint.dir={tmp_path / 'run'}"]))
    (tmp_path / "c.toml").write_text(configfile.dump_toml(cfg))
    mpiexec(4, "train_worker.py", str(tmp_path / "c.toml"), str(tmp_path), timeout=300)
    digests = {(tmp_path / f"digest-{i}.txt").read_text() for i in range(4)}
    assert len(digests) == 1
    # the checkpoint, read with plain h5py in the model's parameter order, hashes the same
    names = [n for n, _ in build_model("llama-tiny", 64, 0, vocab_size=VOCAB_SIZE).named_parameters()]
    with h5py.File(tmp_path / "run" / checkpoint.main_name(2)) as h5:
        digest = hashlib.sha256(b"".join(h5["model"][n][()].tobytes() for n in names)).hexdigest()
        assert h5.attrs["round"] == 2 and h5.attrs["tokens"] == 2 * 3 * 4 * 64 * 4
    assert digests == {digest}
    rows = _metrics(tmp_path / "run" / "metrics.jsonl")
    assert [r["tokens"] for r in rows] == [3 * 4 * 64 * 4] * 2  # H x micro-batch x seq_len x ranks


@pytest.mark.slow
def test_acceptance_three_facilities(tmp_path):
    result = mpifed("simulate", "--facilities", "3", "--ranks-per-facility", "2", "--rounds", "4",
                    "--local-steps", "10", "--metrics", "m.jsonl", "--out", "run", cwd=tmp_path)
    assert result.returncode == 0, f"{result.stdout[-3000:]}\n{result.stderr}"
    rows = _metrics(tmp_path / "m.jsonl")
    assert len(rows) == 4 and all(KEYS <= set(r) for r in rows)
    assert [r["round"] for r in rows] == [1, 2, 3, 4]
    assert rows[-1]["val_loss"] < rows[0]["val_loss"]
    progress = [line for line in result.stdout.splitlines() if line.startswith("round")]
    assert len(progress) == 4 and "val_loss" in progress[0] and "tokens/s" in progress[0]
    names = {n for n, _ in build_model("llama-tiny", 128, 0, vocab_size=VOCAB_SIZE).named_parameters()}
    files = checkpoint.main_files(tmp_path / "run")
    assert [f.name for f in files] == [checkpoint.main_name(r) for r in (1, 2, 3, 4)]
    numel = 0
    for f in files:
        with h5py.File(f) as h5:
            assert set(h5["model"]) == names
            numel = sum(ds.size for ds in h5["model"].values())
    # three facilities each send 2/3 of an fp32 model to the others in the reduce-scatter (all but the
    # chunk they sum themselves) and their summed chunk to the two others in the all-gather: 4 models in all
    assert all(r["bytes_inter"] == 4 * numel * 4 for r in rows)


def test_a_finished_run_exits_0_under_a_launch_wrapper_that_does_not_exec(tmp_path):
    """Site launchers often put a process of their own between mpiexec and Python (a shell script
    without `exec`, /usr/bin/time, a container starter). A run that finished must still exit 0 there:
    MPICH tells its process manager that a rank is done only in a C exit handler, and a rank that left
    without it (os._exit) was taken for a crash and every rank SIGKILLed (exit 9, 'Killed (signal 9)')."""
    cfg = configfile.from_dict(configfile.apply_sets({}, [
        "facility.f0.ranks=1", "facility.f1.ranks=1", "train.local_steps=2", "federation.rounds=1",
        "train.micro_batch=2", "data.seq_len=32", f"checkpoint.dir={tmp_path / 'run'}"]))
    (tmp_path / "c.toml").write_text(configfile.dump_toml(cfg))
    wrapper = tmp_path / "wrap.sh"
    wrapper.write_text('#!/bin/sh\n"$@"\n')  # no exec: the wrapper stays the launcher's child
    wrapper.chmod(0o755)
    result = run([MPIEXEC, "-n", "2", str(wrapper), sys.executable, "-m", "mpifed", "run", str(tmp_path / "c.toml")],
                 timeout=240)
    assert result.returncode == 0, f"{result.stdout[-2000:]}\n{result.stderr}"
    assert "mpifed: done" in result.stdout
    assert (tmp_path / "run" / "latest").read_text().strip() == checkpoint.main_name(1)


@pytest.mark.slow
def test_validation_loss_falls_over_five_rounds(tmp_path):
    result = mpifed("simulate", "--rounds", "5", "--local-steps", "10", "--out", "run", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    losses = [r["val_loss"] for r in _metrics(tmp_path / "run" / "metrics.jsonl")]
    assert len(losses) == 5
    assert all(b < a for a, b in zip(losses, losses[1:])), losses
    assert losses[-1] < losses[0] - 1.0  # from ~5.5 (uniform over 256 bytes) it learns real structure
    assert np.isfinite(losses).all()


def _datasets(path):
    out = {}
    with h5py.File(path) as h5:
        h5.visititems(lambda name, obj: out.__setitem__(name, obj[()]) if isinstance(obj, h5py.Dataset) else None)
    return out


@pytest.mark.slow
@pytest.mark.parametrize("settings", [
    ["federation.roots=1", "federation.outer=fedavgm", "train.schedule=cosine", "train.warmup_steps=3",
     "train.optimizer=sgd", "train.momentum=0.9", "train.lr=0.05"],  # SGD's momentum buffer checkpointed
    ["federation.roots=2", "federation.outer=diloco", "federation.outer_warmup=4", "federation.compress=int8",
     "facility.f0.engine=fsdp", "facility.f1.engine=deepspeed", "train.grad_accum=2"],
    ["federation.overlap=delayed", "federation.fragments=2", "federation.overlap_steps=1", "federation.compress=int4",
     "federation.outer=diloco", "facility.f1.engine=fsdp"]],
    ids=["replica-cosine-sgd", "fsdp-zero2-int8", "delayed-fragments-int4"])
def test_resume_after_sigkill_is_bit_identical(tmp_path, settings):
    common = ["simulate", "--rounds", "6", "--local-steps", "4", "--set", "train.micro_batch=4",
              "--set", "data.seq_len=64", *[arg for s in settings for arg in ("--set", s)]]
    straight = mpifed(*common, "--out", "a", cwd=tmp_path)
    assert straight.returncode == 0, straight.stderr

    killed = subprocess.Popen([sys.executable, "-m", "mpifed", *common, "--out", "b"], cwd=tmp_path, env=rank_env(),
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    latest, deadline = tmp_path / "b" / "latest", time.monotonic() + 240
    while not (latest.exists() and latest.read_text().strip() >= "round_00003.h5"):
        assert killed.poll() is None and time.monotonic() < deadline, "the run ended before round 3"
        time.sleep(0.02)
    os.killpg(killed.pid, signal.SIGKILL)
    killed.wait()
    assert not (tmp_path / "b" / "round_00006.h5").exists()

    resumed = mpifed(*common, "--out", "b", "--resume", "auto", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    assert "mpifed: resuming from b/round_0000" in resumed.stdout
    a, b = _datasets(tmp_path / "a" / "round_00006.h5"), _datasets(tmp_path / "b" / "round_00006.h5")
    assert a.keys() == b.keys() and any(k.startswith("outer/momentum/") for k in a)
    for name in a:
        assert a[name].tobytes() == b[name].tobytes(), name
    losses = lambda run: [(r["round"], r["train_loss"], r["val_loss"]) for r in _metrics(tmp_path / run / "metrics.jsonl")]
    assert losses("a") == losses("b") and len(losses("a")) == 6


def _rank_pid(cwd: Path, rank: int) -> int:
    """The pid of world rank `rank` of the `mpifed run` job started in folder `cwd`."""
    for pid in subprocess.run(["pgrep", "-f", "mpifed run"], capture_output=True, text=True).stdout.split():
        try:
            here = Path(f"/proc/{pid}/cwd").resolve() == cwd.resolve()
            if here and f"PMI_RANK={rank}".encode() in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0"):
                return int(pid)
        except OSError:
            pass
    raise AssertionError(f"no rank {rank} of mpifed run in {cwd}")


def _signal_after_round_one(args: list[str], cwd: Path, send) -> tuple[int, list[str], str, list[int]]:
    """Run `mpifed ARGS` in `cwd`; once round 1's line is out, `send(proc)` a signal. Returns the exit
    code, the stdout lines, stderr, and the rounds whose lines were printed."""
    proc = subprocess.Popen([sys.executable, "-m", "mpifed", *args], cwd=cwd, env=rank_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    lines = []
    try:
        for line in proc.stdout:
            lines.append(line)
            if line.startswith("round   1/"):
                send(proc)
        proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    rounds = [int(line.split()[1].split("/")[0]) for line in lines if line.startswith("round ")]
    return proc.returncode, lines, proc.stderr.read(), rounds


@pytest.mark.slow
def test_a_planned_stop_checkpoints_its_round_and_resumes_bit_identical(tmp_path):
    """SIGUSR1 to one rank of f1 (as SLURM signals a site's tasks ahead of its walltime): every facility
    stops after the round in progress, which is checkpointed though checkpoint.every skips it, and exits
    with STOPPED_EXIT; --resume auto then ends exactly where a run that never stopped ends, with an
    exchange that was in flight (overlap, fragments) carried across."""
    common = ["simulate", "--rounds", "6", "--local-steps", "4", "--set", "train.micro_batch=4",
              "--set", "data.seq_len=64", "--set", "checkpoint.every=5", "--set", "federation.overlap=delayed",
              "--set", "federation.fragments=2", "--set", "federation.outer=diloco"]
    straight = mpifed(*common, "--out", "a", cwd=tmp_path)
    assert straight.returncode == 0, straight.stderr

    code, lines, err, rounds = _signal_after_round_one(  # to world rank 3: one of f1's
        [*common, "--out", "b"], tmp_path, lambda proc: os.kill(_rank_pid(tmp_path, 3), signal.SIGUSR1))
    out = "".join(lines)
    assert code == STOPPED_EXIT, err
    last = rounds[-1]
    assert 2 <= last < 6 and rounds == list(range(1, last + 1)), out
    assert f"mpifed: stopping after round {last} of 6, as asked by f1 (SIGUSR1)" in out
    assert "continue with --resume auto" in err
    assert (tmp_path / "b" / "latest").read_text().strip() == checkpoint.main_name(last)
    assert not (tmp_path / "b" / checkpoint.main_name(last + 1)).exists()
    assert mpifed("ckpt", "verify", str(tmp_path / "b")).returncode == 0

    resumed = mpifed(*common, "--out", "b", "--resume", "auto", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    assert f"resuming from b/{checkpoint.main_name(last)}" in resumed.stdout
    a, b = _datasets(tmp_path / "a" / "round_00006.h5"), _datasets(tmp_path / "b" / "round_00006.h5")
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].tobytes() == b[name].tobytes(), name


@pytest.mark.slow
def test_simulate_passes_a_stop_signal_on_to_every_rank(tmp_path):
    """SIGTERM to `mpifed simulate` itself (as a batch job's shell gets it): every facility's ranks get
    it and stop after the round in progress, its checkpoint published."""
    code, lines, err, rounds = _signal_after_round_one(
        ["simulate", "--rounds", "30", "--local-steps", "3", "--out", "run", "--set", "checkpoint.every=100"],
        tmp_path, lambda proc: proc.send_signal(signal.SIGTERM))
    out = "".join(lines)
    assert code == STOPPED_EXIT, err
    last = rounds[-1]
    assert f"stopping after round {last} of 30, as asked by f0 (SIGTERM), f1 (SIGTERM)" in out
    assert (tmp_path / "run" / "latest").read_text().strip() == checkpoint.main_name(last)


@pytest.mark.slow
def test_a_failed_round_keeps_the_last_checkpoint(tmp_path):
    common = ["simulate", "--local-steps", "2", "--out", "run", "--set", "data.seq_len=64", "--set", "train.micro_batch=4"]
    assert mpifed(*common, "--rounds", "1", cwd=tmp_path).returncode == 0
    before = (tmp_path / "run" / "round_00001.h5").read_bytes()
    # an absurd learning rate blows every facility's update up to NaN/Inf: the guard leaves them all out
    failed = mpifed(*common, "--rounds", "2", "--resume", "auto", "--set", "train.lr=1e30", cwd=tmp_path)
    assert failed.returncode != 0
    assert "only 0 facilities are left this round, fewer than federation.min_participants = 1" in failed.stderr
    assert "f0: its update has NaN/Inf values" in failed.stderr and "the last checkpoint is kept" in failed.stderr
    assert (tmp_path / "run" / "latest").read_text().strip() == "round_00001.h5"
    assert (tmp_path / "run" / "round_00001.h5").read_bytes() == before
    assert not (tmp_path / "run" / "round_00002.h5").exists()
    assert mpifed("ckpt", "verify", str(tmp_path / "run")).returncode == 0


def test_a_resumed_log_drops_the_line_a_killed_run_left_half_written(tmp_path):
    """A run killed while writing round 3's line leaves it cut; resuming after round 2 keeps rounds 1-2."""
    from mpifed.run.metrics import MetricsLog

    path = tmp_path / "metrics.jsonl"
    rounds = [json.dumps({"round": r, "train_loss": 1.0 / r}) for r in (1, 2, 3)]
    path.write_text("\n".join(rounds[:2] + [rounds[2][:17]]))  # no newline: cut mid-line
    MetricsLog(path, after_round=2).close()
    assert path.read_text().splitlines() == rounds[:2]
    path.write_text("\n".join(rounds) + "\n")
    MetricsLog(path, after_round=2).close()  # a whole line past the resume point is dropped as before
    assert path.read_text().splitlines() == rounds[:2]
