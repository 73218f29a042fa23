"""Signals to a rank: the first SIGTERM or SIGUSR1 only asks for a planned stop; a second (or a SIGINT
after it) ends the process at once with that signal's default action, also while the rank is blocked
in MPI, where Python-level handlers never run (mpifed/run/stop.py)."""
import signal
import subprocess
import sys
import time

import pytest

from conftest import WORKERS, rank_env


@pytest.mark.parametrize("first,second", [(signal.SIGTERM, signal.SIGTERM), (signal.SIGUSR1, signal.SIGINT)],
                         ids=["term-term", "usr1-int"])
def test_a_second_signal_ends_a_rank_blocked_in_mpi_at_once(first, second):
    proc = subprocess.Popen([sys.executable, str(WORKERS / "blocked_worker.py")], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=rank_env())
    try:
        assert proc.stdout.readline().strip() == "ready"
        time.sleep(0.5)  # well inside the receive
        proc.send_signal(first)
        time.sleep(1.0)
        assert proc.poll() is None, "the first signal only asks for a planned stop"
        proc.send_signal(second)
        # without the watcher the process stays in the receive for good: bounded here, not timed
        code = proc.wait(timeout=30)
    finally:
        proc.kill()
        proc.communicate()
    assert code == -second


def test_one_signal_is_noted_for_the_next_round_boundary():
    """In a live interpreter: the first SIGUSR1 is what `requested` reports, and the process goes on."""
    from mpifed.run import stop

    stop.install()
    try:
        signal.raise_signal(signal.SIGUSR1)
        deadline = time.monotonic() + 10
        while not stop.requested() and time.monotonic() < deadline:
            time.sleep(0.01)
        assert stop.requested() == signal.SIGUSR1
    finally:
        stop.uninstall()
    assert signal.getsignal(signal.SIGUSR1) == signal.SIG_DFL
