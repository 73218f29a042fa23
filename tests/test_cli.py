"""The command line: bad input gives one line naming the option, exit 2, no traceback, nothing written."""
import json
import subprocess
import sys

import pytest

from conftest import MPIEXEC, mpifed, rank_env, run


def _one_line_error(result, *words):
    assert result.returncode == 2, result
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr and result.stdout == ""
    for word in words:
        assert word in lines[0], lines[0]
    return lines[0]


@pytest.mark.parametrize("args, words", [
    (["--facilities", "0"], ["--facilities", "0 is not in the range"]),
    (["--rounds", "-1"], ["--rounds", "-1"]),
    (["--local-steps"], ["--local-steps", "requires an argument"]),
    (["--ranks-per-facility", "two"], ["--ranks-per-facility", "'two' is not a valid integer"]),
    (["--set", "train.nope=1"], ["train.nope", "valid keys"]),
    (["--set", "train.lr=-1"], ["train.lr", "positive"]),
    (["--local-steps", "4", "--set", "federation.fragments=8"], ["federation.fragments", "train.local_steps = 4"]),
])
def test_bad_options(tmp_path, args, words):
    line = _one_line_error(mpifed("simulate", "--out", str(tmp_path / "out"), *args), *words)
    assert line.startswith("mpifed simulate: error:")
    assert not (tmp_path / "out").exists()


def test_unwritable_out(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    _one_line_error(mpifed("simulate", "--out", str(blocker / "run")), "--out", "not a folder")
    assert blocker.read_text() == "x"
    _one_line_error(mpifed("simulate", "--out", str(blocker)), "--out", "not a folder")
    _one_line_error(mpifed("simulate", "--out", "/proc/mpifed-run"), "--out")
    _one_line_error(mpifed("simulate", "--out", str(tmp_path / "ok"), "--metrics", str(blocker / "m.jsonl")),
                    "--metrics")
    assert not (tmp_path / "ok").exists()


def test_refuses_to_replace_checkpoints(tmp_path):
    (tmp_path / "round_00001.h5").write_bytes(b"an earlier run")
    _one_line_error(mpifed("simulate", "--out", str(tmp_path)), "--out", "--overwrite")
    assert (tmp_path / "round_00001.h5").read_bytes() == b"an earlier run"


def test_facilities_flag_conflicts_with_config_facilities(tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_text('[[facility]]\nname = "a"\nranks = 1\n')
    _one_line_error(mpifed("simulate", "--config", str(cfg), "--facilities", "3"), "--facilities", "facility")


def test_dry_run_prints_one_program_per_facility(tmp_path):
    result = mpifed("simulate", "--dry-run", "--facilities", "3", "--ranks-per-facility", "2",
                    "--set", "facility.f2.ranks=1", "--out", str(tmp_path / "o"))
    assert result.returncode == 0, result.stderr
    launch = result.stdout.strip().splitlines()[-1]
    assert launch.count(" : ") == 2 and launch.count("-n 2 ") == 2 and launch.count("-n 1 ") == 1
    assert "mpifed run" in launch and not (tmp_path / "o").exists()


def test_help_explains_and_cli_import_is_light():
    result = mpifed("simulate", "--help")
    assert result.returncode == 0 and "--ranks-per-facility" in result.stdout and "--set" in result.stdout
    probe = subprocess.run([sys.executable, "-c", "import sys, mpifed.cli.main; print('torch' in sys.modules)"],
                           capture_output=True, text=True, check=True)
    assert probe.stdout.strip() == "False"  # --help and input errors answer without loading torch


def test_resume_flags(tmp_path):
    (tmp_path / "round_00001.h5").write_bytes(b"an earlier run")
    line = _one_line_error(mpifed("simulate", "--out", str(tmp_path)), "--out", "--resume auto")
    assert "--overwrite" in line
    _one_line_error(mpifed("simulate", "--out", str(tmp_path), "--resume", "auto", "--overwrite"),
                    "--overwrite and --resume exclude each other")
    _one_line_error(mpifed("simulate", "--out", str(tmp_path), "--resume", str(tmp_path / "nope.h5")),
                    "--resume", "does not exist")
    assert (tmp_path / "round_00001.h5").read_bytes() == b"an earlier run"
    (tmp_path / "latest").write_text("round_00001.h5\n")
    dry = mpifed("simulate", "--out", str(tmp_path), "--overwrite", "--dry-run")
    assert dry.returncode == 0 and (tmp_path / "latest").exists()  # a dry run touches nothing
    dry = mpifed("simulate", "--out", str(tmp_path), "--resume", "auto", "--dry-run")
    assert dry.returncode == 0 and "--resume auto" in dry.stdout.splitlines()[-1]


@pytest.mark.slow
def test_a_resume_with_another_model_says_what_differs_and_writes_nothing(tmp_path):
    """Issue 32 item 9: it failed after MPI had started, on every rank, naming only a fingerprint, and
    had already overwritten the run's mpifed.toml."""
    first = mpifed("simulate", "--rounds", "1", "--local-steps", "1", "--out", str(tmp_path / "run"))
    assert first.returncode == 0, first.stderr
    before = {p.name: p.read_bytes() for p in (tmp_path / "run").iterdir()}
    line = _one_line_error(mpifed("simulate", "--rounds", "2", "--local-steps", "1", "--out", str(tmp_path / "run"),
                                  "--resume", "auto", "--set", "model.preset=llama-small", "--facilities", "3"),
                           "--resume: round_00001.h5 was trained with another model.preset 'llama-tiny' -> "
                           "'llama-small', facilities (name, ranks) [('f0', 2), ('f1', 2)] -> "
                           "[('f0', 2), ('f1', 2), ('f2', 2)]",
                           f"--config {tmp_path / 'run' / 'mpifed.toml'}")
    assert "nothing was written" in line
    assert {p.name: p.read_bytes() for p in (tmp_path / "run").iterdir()} == before
    # `mpifed run`, as a batch job starts it: the same line on the first rank only, before MPI starts
    result = run([MPIEXEC, "-n", "4", sys.executable, "-m", "mpifed", "run", str(tmp_path / "run" / "mpifed.toml"),
                  "--resume", "auto", "--set", "model.preset=llama-small"], timeout=120)
    assert result.returncode == 2 and result.stderr.count("mpifed run: error:") == 1, result
    assert ("--resume: round_00001.h5 was trained with another model.preset 'llama-tiny' -> 'llama-small'; resume "
            f"with the configuration it was trained with (`mpifed ckpt inspect --config {tmp_path / 'run'}` prints it)"
            ) in result.stderr and "Traceback" not in result.stderr
    assert {p.name: p.read_bytes() for p in (tmp_path / "run").iterdir()} == before
    printed = mpifed("ckpt", "inspect", "--config", str(tmp_path / "run"))
    assert printed.returncode == 0 and printed.stdout == (tmp_path / "run" / "mpifed.toml").read_text(), printed
    again = mpifed("simulate", "--config", str(tmp_path / "run" / "mpifed.toml"), "--rounds", "2",
                   "--resume", "auto")  # the fix the line gives
    assert again.returncode == 0, again.stderr


def test_simulate_refuses_what_cannot_fit_on_this_machine_before_mpiexec(tmp_path):
    """Issue 32 item 4: a million ranks and micro_batch = 1e9 were accepted (mpiexec -n 1000000)."""
    from mpifed.preflight import RUNTIME_GB, this_machine

    machine = this_machine() / 1e9
    each = RUNTIME_GB + 8 * 8 * 128 * 256 / 1e9  # the runtime, logits and their gradient: 8 x 128 x 256 fp32
    line = _one_line_error(mpifed("simulate", "--ranks-per-facility", "500000", "--out", str(tmp_path / "a")),
                           f"1,000,000 ranks need at least {1e6 * each:,.1f} GB", f"this machine has {machine:,.1f} GB",
                           "use fewer ranks")
    assert f"({RUNTIME_GB:.2f} GB each" in line
    line = _one_line_error(mpifed("simulate", "--set", "train.micro_batch=1000000000", "--out", str(tmp_path / "b")),
                           # the site's bound (every command's) says it first: one node cannot hold two such ranks
                           "facility.f0: 2 ranks on a node of local need at least",
                           "one micro-batch of 1,000,000,000 sequences' logits",
                           "train.micro_batch")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_run_refuses_what_no_node_of_its_site_can_hold_before_mpi(tmp_path):
    """Issue 32 item 4 for `mpifed run`, as the batch jobs start it: the site profile knows a node's memory
    and how many ranks it runs; a micro-batch no node can hold is one line per facility, from the first
    rank only, exit 2, nothing written. A model folder's positions bound data.seq_len the same way."""
    from mpifed.deploy.sites import get
    from mpifed.preflight import RUNTIME_GB, this_machine

    node = get("leonardo").scheduler
    each = RUNTIME_GB + 8 * 1_000_000 * 128 * 256 / 1e9
    cfg = tmp_path / "c.toml"
    cfg.write_text(f'[train]\nmicro_batch = 1000000\n[checkpoint]\ndir = "{tmp_path / "out"}"\n'
                   '[[facility]]\nname = "leo"\nranks = 8\nsite = "leonardo"\n'
                   '[[facility]]\nname = "home"\nranks = 2\nsite = "local"\n')
    result = run([MPIEXEC, "-n", "10", sys.executable, "-m", "mpifed", "run", str(cfg)], timeout=120)
    assert result.returncode == 2 and result.stderr.count("mpifed run: error:") == 1, result
    line = result.stderr.strip()
    assert (f"facility.leo: {node.ranks_per_node} ranks on a node of leonardo need at least "
            f"{node.ranks_per_node * each:,.1f} GB ({each:,.2f} GB each: the runtime and one micro-batch of 1,000,000 "
            f"sequences' logits), and the node has {node.memory_gb:,.1f} GB; use a smaller train.micro_batch") in line
    if this_machine() < 2 * each * 1e9:  # a site without a node size: this machine's memory stands for it
        assert "facility.home: 2 ranks on a node of local" in line
    assert "\n" not in line
    assert not (tmp_path / "out").exists() and "Traceback" not in result.stderr
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_positions": 64}))
    cfg.write_text(f'[model]\npath = "{tmp_path / "m"}"\n[data]\nseq_len = 128\n')
    _one_line_error(mpifed("run", str(cfg)), "data.seq_len: 128 tokens, more than the 64 positions of model.path",
                    "(n_positions in its config.json)")


def test_ckpt_commands_name_what_is_wrong(tmp_path):
    result = mpifed("ckpt", "inspect", str(tmp_path))
    assert result.returncode == 2 and "no checkpoint in this folder" in result.stderr
    (tmp_path / "round_00001.h5").write_bytes(b"not hdf5")
    result = mpifed("ckpt", "verify", str(tmp_path / "round_00001.h5"))
    assert result.returncode == 1 and "not a readable HDF5 file" in result.stderr and "Traceback" not in result.stderr


def test_run_refuses_a_checkpoint_dir_it_cannot_write(tmp_path):
    """A read-only checkpoint.dir (a bind mount in a mount namespace of its own: root may write anywhere
    else) is one line and exit 2 before MPI starts, from every launch form."""
    out = tmp_path / "ckpt"
    out.mkdir()
    cfg = tmp_path / "c.toml"
    cfg.write_text(f'[checkpoint]\ndir = "{out / "run"}"\n')
    launch = [MPIEXEC, "-n", "2", sys.executable, "-m", "mpifed", "run", str(cfg)]
    probe = subprocess.run(["unshare", "-m", "true"], capture_output=True)
    if probe.returncode != 0:
        pytest.skip(f"mount namespaces are not permitted here: {probe.stderr.decode().strip()}")
    result = run(["unshare", "-m", "sh", "-c", f'mount --bind -o ro "{out}" "{out}" && exec "$@"', "sh", *launch],
                 timeout=120)
    assert result.returncode == 2, result
    assert result.stderr.count("error") == 1  # from the first rank only: every rank fails alike
    assert f"mpifed run: error: checkpoint.dir: cannot write to {out / 'run'}: no write permission on {out}" in result.stderr
    assert "Traceback" not in result.stderr and not list(out.iterdir())


def test_run_refuses_to_mix_with_an_earlier_run(tmp_path):
    """`mpifed run` (what batch jobs start) must not write into another run's checkpoints."""
    out = tmp_path / "ckpt"
    out.mkdir()
    (out / "round_00003.h5").write_bytes(b"an earlier run")
    cfg = tmp_path / "c.toml"
    cfg.write_text(f'[checkpoint]\ndir = "{out}"\n')
    result = run([MPIEXEC, "-n", "4", sys.executable, "-m", "mpifed", "run", str(cfg)], timeout=120)
    assert result.returncode != 0
    assert result.stderr.count("already holds 1 checkpoint file(s) of an earlier run; pass --resume auto") == 1
    assert (out / "round_00003.h5").read_bytes() == b"an earlier run" and len(list(out.iterdir())) == 1


def _simulate_one_round(out, stdout):
    return subprocess.Popen([sys.executable, "-m", "mpifed", "simulate", "--facilities", "1", "--ranks-per-facility",
                             "1", "--rounds", "2", "--local-steps", "30", "--out", str(out)],
                            stdout=stdout, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL, env=rank_env(),
                            start_new_session=True)


def test_a_terminal_gets_a_live_bar_and_a_pipe_only_the_round_lines(tmp_path):
    import os
    import pty

    master, slave = pty.openpty()
    proc = _simulate_one_round(tmp_path / "tty", slave)
    os.close(slave)
    chunks = []
    while True:
        try:
            chunk = os.read(master, 4096)
        except OSError:  # the terminal's last writer is gone
            break
        if not chunk:
            break
        chunks.append(chunk)
    assert proc.wait(timeout=240) == 0
    shown = b"".join(chunks).decode(errors="replace")
    assert "round 1/2" in shown and "step" in shown and "\r" in shown  # the bar, redrawn in place
    assert "round   1/2  train_loss" in shown and "round   2/2  train_loss" in shown
    piped = _simulate_one_round(tmp_path / "pipe", subprocess.PIPE)
    out, _ = piped.communicate(timeout=240)
    assert piped.returncode == 0 and "round   2/2  train_loss" in out.decode()
    assert "\r" not in out.decode() and "step/s" not in out.decode()  # batch jobs: the lines alone


def test_quiet_and_verbose_reach_every_rank_and_lines_keep_their_streams(tmp_path):
    """Issue 34: one logging setup. At the default level a run's lines read as before (info on stdout,
    `mpifed: warning:` and errors on stderr); `mpifed --quiet` leaves only warnings and errors, for every
    rank mpiexec starts; `--verbose` adds debug lines with each record's rank and facility in front."""
    small = ["--facilities", "2", "--ranks-per-facility", "1", "--rounds", "1", "--local-steps", "1",
             "--set", "train.micro_batch=2", "--set", "data.seq_len=32", "--overwrite"]
    normal = mpifed("simulate", *small, "--out", str(tmp_path / "n"))
    assert normal.returncode == 0, normal.stderr
    assert "mpifed: 2 facilities:" in normal.stdout and "round   1/1  train_loss" in normal.stdout
    quiet = mpifed("--quiet", "simulate", *small, "--out", str(tmp_path / "q"))
    assert quiet.returncode == 0 and quiet.stdout == "", quiet
    assert not [line for line in quiet.stderr.splitlines() if line.startswith("mpifed")], quiet.stderr
    assert (tmp_path / "q" / "metrics.jsonl").read_text().count("\n") == 1  # it did train, silently
    loud = mpifed("-v", "simulate", *small, "--out", str(tmp_path / "v"))
    assert loud.returncode == 0, loud.stderr
    tagged = [line for line in loud.stdout.splitlines() if line.startswith("[rank ")]
    assert {line.split("]")[0] for line in tagged} == {"[rank 0, facility f0", "[rank 1, facility f1"}
    assert any("mpifed: phase: " in line for line in tagged)
    assert "[rank 0, facility f0] mpifed: 2 facilities:" in loud.stdout

    probe = ("from mpifed.logs import LOG\n"
             "LOG.info('said'); LOG.warning('careful'); LOG.error('mpifed run: error: bad')\n"
             "LOG.debug('hidden')\n")
    said = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=rank_env(), timeout=60)
    assert said.stdout == "mpifed: said\n"
    assert said.stderr == "mpifed: warning: careful\nmpifed run: error: bad\n"
