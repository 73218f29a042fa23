"""A site that goes down, at each phase of a run of separately launched facilities: every other site
exits non-zero within federation.timeout_s + 30 s, with one line that names the lost facility and the
phase, no traceback, and the newest complete checkpoint still verifies.

The site goes down through MPIFED_DIE_AT (mpifed/comm/watchdog.py): on entering the named phase its
rank kills its own process group, as when a site's job is killed."""
import json
import re
import secrets
import sys

import pytest

from conftest import launch_all, mpifed
from mpifed import configfile

TOKEN = secrets.token_urlsafe(32)  # a fresh one per run, as `mpifed token` writes
TIMEOUT = 10


def _config(tmp_path, *sets: str):
    base = ["data.seq_len=64", "train.local_steps=3", "train.micro_batch=4", "federation.rounds=5",
            f"federation.rendezvous={tmp_path / 'port.txt'}", "federation.join_timeout_s=60",
            f"federation.timeout_s={TIMEOUT}", f"checkpoint.dir={tmp_path / 'run'}"]
    data = {"facility": [{"name": "a", "ranks": 2}, {"name": "b", "ranks": 1}]}
    cfg = configfile.from_dict(configfile.apply_sets(data, base + list(sets)))
    (tmp_path / "c.toml").write_text(configfile.dump_toml(cfg))
    return tmp_path / "c.toml"


def _run(config, name, *extra):
    return [sys.executable, "-m", "mpifed", "run", str(config), "--facility", name, *extra]


def _lose_b_at(tmp_path, phase: str, *extra: str):
    """Hub a (2 ranks) and b (1 rank) launched separately; b goes down on entering `phase`."""
    config = tmp_path / "c.toml"
    a, b = launch_all([(2, _run(config, "a", *extra), {"MPIFED_TOKEN": TOKEN}),
                       (1, _run(config, "b", *extra), {"MPIFED_TOKEN": TOKEN, "MPIFED_DIE_AT": phase})], timeout=240)
    assert f"this launch goes down at '{phase}" in b.stdout, b.stdout + b.stderr
    assert b.returncode != 0
    return a, b


def _assert_one_line_naming_b(a, b, phase: str) -> None:
    assert a.returncode != 0
    assert a.ended - b.ended < TIMEOUT + 30, f"a went on for {a.ended - b.ended:.0f} s after b was lost"
    lines = [line for line in a.stderr.splitlines() if line.startswith("mpifed:")]
    assert len(lines) == 1, a.stderr
    assert re.match(rf"mpifed: error: {re.escape(phase)}.* did not finish within {TIMEOUT} s \(federation.timeout_s\)"
                    r"; lost facility b \(no answer\); aborting the job$", lines[0]), lines[0]
    assert "Traceback" not in a.stderr


@pytest.mark.parametrize("phase", ["layout check", "round 3: exchange"])
def test_a_site_lost_at_start_or_mid_round_is_named(tmp_path, phase):
    _config(tmp_path)
    a, b = _lose_b_at(tmp_path, phase)
    _assert_one_line_naming_b(a, b, phase)
    if phase.startswith("round"):  # rounds 1 and 2 were checkpointed: the newest still verifies
        assert mpifed("ckpt", "verify", str(tmp_path / "run")).returncode == 0
        assert (tmp_path / "run" / "latest").read_text().strip() == "round_00002.h5"


def test_a_site_lost_during_resume_is_named_and_the_checkpoint_kept(tmp_path):
    config = _config(tmp_path, "federation.rounds=2")
    first = launch_all([(2, _run(config, "a"), {"MPIFED_TOKEN": TOKEN}), (1, _run(config, "b"), {"MPIFED_TOKEN": TOKEN})],
                       timeout=240)
    assert all(r.returncode == 0 for r in first), first[0].stderr + first[1].stderr
    before = {p.name: p.read_bytes() for p in (tmp_path / "run").iterdir() if p.name.startswith("round_")}
    _config(tmp_path, "federation.rounds=4")
    a, b = _lose_b_at(tmp_path, "resume", "--resume", "auto")
    _assert_one_line_naming_b(a, b, "resume")
    after = {p.name: p.read_bytes() for p in (tmp_path / "run").iterdir() if p.name.startswith("round_")}
    assert after == before
    assert mpifed("ckpt", "verify", str(tmp_path / "run")).returncode == 0


def test_a_hub_lost_while_a_facility_waits_to_join_ends_it_at_the_hubs_deadline(tmp_path):
    """b is in and waits with the hub for c, which never comes; the hub goes down: b ends when the hub's
    admission window (plus the handshake and timeout slack) is over, naming the phase."""
    config = _config(tmp_path, "federation.join_timeout_s=15")
    data = configfile.load(config)
    data["facility"].append({"name": "c", "ranks": 1})
    config.write_text(configfile.dump_toml(configfile.from_dict(data)))
    a, b = launch_all([(2, _run(config, "a"), {"MPIFED_TOKEN": TOKEN, "MPIFED_DIE_AT": "join: admitting"}),
                       (1, _run(config, "b"), {"MPIFED_TOKEN": TOKEN})], timeout=240, starts=[0, 0])
    assert a.returncode != 0 and b.returncode != 0
    lines = [line for line in b.stderr.splitlines() if line.startswith("mpifed:")]
    assert len(lines) == 1 and "Traceback" not in b.stderr, b.stderr
    assert "join: in, waiting with the hub a for the others did not finish within" in lines[0]


def test_a_facility_that_sits_a_round_out_waits_as_long_as_the_others_train(tmp_path):
    """federation.sample = 0.5 of two facilities: each round one trains for several times timeout_s while
    the other waits for it. Nothing times out (the deadline starts when a facility that trained arrives),
    and the metrics show the wait."""
    timeout = 1.5
    result = mpifed("simulate", "--facilities", "2", "--ranks-per-facility", "1", "--rounds", "2",
                    "--local-steps", "250", "--out", str(tmp_path / "run"), "--set", "federation.sample=0.5",
                    "--set", f"federation.timeout_s={timeout}", timeout=300)
    assert result.returncode == 0, result.stderr
    rounds = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(rounds) == 2
    for metrics in rounds:
        assert metrics["inner_s"] > 2 * timeout, "the facility that trained must take longer than the deadline"
        assert metrics["idle_s"] > 2 * timeout  # the facility that sat out waited that long, and went on
