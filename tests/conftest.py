"""Shared helpers: run real mpiexec jobs (never a fake communicator) and the mpifed CLI, each with a
hard timeout that kills the whole process group, so a stuck rank fails its test instead of hanging CI."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
WORKERS = Path(__file__).resolve().parent / "mpi"
MPIEXEC = str(Path(sys.executable).parent / "mpiexec")


os.environ.pop("MPIFED_LOG", None)  # the tests read the default level's lines, whatever the shell exported


def rank_env() -> dict[str, str]:
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1", TRANSFORMERS_VERBOSITY="error",
               OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    return env


def run(command: list[str], timeout: float, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """Run `command` in its own process group; on timeout kill the group and fail the test."""
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=cwd,
                            env=rank_env(), start_new_session=True, stdin=subprocess.DEVNULL)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"timed out after {timeout}s: {' '.join(command)}\n--- stdout\n{out}\n--- stderr\n{err}")
    return subprocess.CompletedProcess(command, proc.returncode, out, err)


def mpiexec(n: int | list[int], worker: str, *args: str, timeout: float = 240, check: bool = True
            ) -> subprocess.CompletedProcess:
    """Run tests/mpi/WORKER under mpiexec; a list of sizes makes an MPMD launch, one program each."""
    program = [sys.executable, str(WORKERS / worker), *args]
    command = [MPIEXEC]
    for i, size in enumerate([n] if isinstance(n, int) else n):
        command += ([":"] if i else []) + ["-n", str(size), *program]
    result = run(command, timeout)
    if check and result.returncode != 0:
        pytest.fail(f"mpiexec exited {result.returncode}\n--- stdout\n{result.stdout}\n--- stderr\n{result.stderr}")
    return result


def mpifed(*args: str, cwd: Path | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    return run([sys.executable, "-m", "mpifed", *args], timeout, cwd=cwd)


# The standard library's documentation as a small corpus on disk: one folder (source) per package,
# one text file of docstrings per module. Real English text, the same on every machine of a Python build.
CORPUS_PACKAGES = ("email", "json", "http", "asyncio", "xml", "concurrent", "importlib", "logging")


QUICK = (
    # the package's shape, its settings and codecs, the sealed links and handshake, model and data
    "test_architecture.py::", "test_config.py::", "test_compress.py::", "test_seal.py::", "test_handshake.py::",
    "test_links.py::", "test_model.py::", "test_data.py::",
    # checkpoints: damage named and fallen back from, a killed writer, an export that loads
    "test_checkpoint.py::test_damage_is_named_and_resume_falls_back",
    "test_checkpoint.py::test_killed_writer_never_publishes_a_broken_file",
    "test_checkpoint.py::test_export_loads_with_the_same_logits",
    # the exchange against the numpy oracle: FedAvg and DiLoCo, replica and sharded, a codec, the guard
    "test_reduce.py::test_three_rounds_match_numpy[fedavg-sizes2-1-replica]",
    "test_reduce.py::test_three_rounds_match_numpy[diloco-sizes3-3-sharded]",
    "test_reduce.py::test_compressed_exchange[int8-0.26]",
    "test_reduce.py::test_guard_leaves_out_a_bad_facility[1:nan]",
    "test_reduce.py::test_streamed_rounds_match_numpy[delayed-1-fedavg-sharded-0]",
    # training end to end against a plain PyTorch loop (schedules, optimizer state, sampling)
    "test_reference.py::test_three_rounds_equal_a_plain_pytorch_loop[fedavg]",
)
"""`make test-quick`: the tests a change most often breaks, marked `quick` (node ids, or a file's prefix)."""


def pytest_collection_modifyitems(config, items) -> None:
    for item in items:
        if item.nodeid.removeprefix("tests/").startswith(QUICK):
            item.add_marker(pytest.mark.quick)


@pytest.fixture(scope="session")
def corpus_dir(tmp_path_factory) -> Path:
    import sysconfig

    from mpifed.data.corpus import docstrings

    stdlib = Path(sysconfig.get_paths()["stdlib"])
    out = tmp_path_factory.mktemp("corpus")
    for package in CORPUS_PACKAGES:
        for module in sorted((stdlib / package).rglob("*.py")):
            docs = docstrings(module.read_text(encoding="utf-8"))
            if docs:
                target = out / package / f"{module.relative_to(stdlib / package).with_suffix('')}.txt".replace("/", "_")
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_text("\n\n".join(docs), encoding="utf-8")
    return out


@pytest.fixture(scope="session")
def bpe_data(corpus_dir, tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    """The corpus prepared by the real CLI: a trained BPE, 3 by-source partitions of 64-token sequences."""
    out = tmp_path_factory.mktemp("prepared") / "by-source"
    result = mpifed("data", "prepare", str(corpus_dir), "--train-bpe", "1000", "--seq-len", "64", "--partitions", "3",
                    "--split", "by-source", "--num-proc", "2", "--out", str(out))
    assert result.returncode == 0, result.stderr
    return out, result


def launch_all(jobs: list[tuple[int, list[str], dict[str, str]]], timeout: float, starts: list[float] | None = None
               ) -> list[subprocess.CompletedProcess]:
    """Start every job (ranks, arguments, extra environment) under its own mpiexec, as separate sites
    would: one after another, or each `starts[i]` seconds after the first. Wait for all, killing them all
    at `timeout` (a hang fails the test). Each result's `ended` is when it exited (time.monotonic())."""
    procs, first = [], time.monotonic()
    for i, (ranks, args, env) in enumerate(jobs):
        if starts:
            time.sleep(max(0.0, first + starts[i] - time.monotonic()))
        command = [MPIEXEC, "-n", str(ranks), *args]
        procs.append((command, subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                                env={**rank_env(), **env}, start_new_session=True,
                                                stdin=subprocess.DEVNULL)))
        time.sleep(0.3)
    results: list[subprocess.CompletedProcess | None] = [None] * len(procs)

    def wait(i: int, command: list[str], proc: subprocess.Popen) -> None:
        out, err = proc.communicate()
        results[i] = subprocess.CompletedProcess(command, proc.returncode, out, err)
        results[i].ended = time.monotonic()

    waiters = [threading.Thread(target=wait, args=(i, *job), daemon=True) for i, job in enumerate(procs)]
    for waiter in waiters:
        waiter.start()
    deadline = time.monotonic() + timeout
    for waiter in waiters:
        waiter.join(max(0.0, deadline - time.monotonic()))
    if any(waiter.is_alive() for waiter in waiters):
        for _, proc in procs:
            os.killpg(proc.pid, signal.SIGKILL)
        for waiter in waiters:
            waiter.join(10)
        stuck = [" ".join(command) for (command, _), r in zip(procs, results) if r is None or r.returncode == -9]
        pytest.fail(f"still running after {timeout} s: {stuck}\n"
                    + "\n".join(f"{r.stdout}\n{r.stderr}" for r in results if r is not None))
    return results
