"""The HDF5 checkpoint format: round trips with one root and with segment files joined by virtual
datasets; verify catches truncation and flipped bytes and names the dataset; resume falls back to the
last good file; a killed writer never leaves `latest` on a broken file; export loads in transformers
with the same logits."""
import json
import os
import re
import signal
import subprocess
import sys
import time

import h5py
import numpy as np
import pytest
import torch

from conftest import WORKERS, mpifed, rank_env, run
from mpifed.checkpoint import format as checkpoint
from mpifed.checkpoint import retention
from mpifed.checkpoint.files import WriteFailed
from mpifed.checkpoint.format import CheckpointError, _boxes
from mpifed.checkpoint.files import DIGEST, array_hash, content_digest
from mpifed.data.corpus import VOCAB_SIZE
from mpifed.layout import FlatLayout, ParamSlot
from mpifed.model import build_model

ATTRS = dict(tokens=1234, facilities=json.dumps([{"name": "a", "ranks": 2, "engine": "replica"}]), config="")


@pytest.fixture(scope="module")
def tiny():
    model = build_model("llama-tiny", 64, seed=0, vocab_size=VOCAB_SIZE)
    return model, FlatLayout.of(model)


def _write(folder, round_, layout, model, outer, roots=1, config_json="{}"):
    attrs = dict(ATTRS, model_config=config_json)
    if roots == 1:
        return checkpoint.publish(checkpoint.write_main(folder, round_, attrs, layout, [(0, layout.numel)],
                                                        list(outer), [], model=model, outer=outer))
    segs = [(layout.numel * r // roots, layout.numel * (r + 1) // roots) for r in range(roots)]
    for r, (a, b) in enumerate(segs):
        checkpoint.write_segment(folder, round_, r, a, model[a:b], {k: v[a:b] for k, v in outer.items()})
    return checkpoint.publish(checkpoint.write_main(folder, round_, attrs, layout, segs, list(outer), []))


def _flip_byte_in(path, dataset):
    with h5py.File(path) as h5:
        offset = h5[dataset].id.get_offset() + 17
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x40
    path.write_bytes(bytes(data))


def test_boxes_cover_flat_ranges_exactly():
    for shape in [(7,), (3, 4), (2, 3, 5), (4, 1, 3)]:
        n = int(np.prod(shape))
        for a in range(n + 1):
            for b in range(a, n + 1):
                target, covered = np.full(shape, -1), 0
                for index, start, count in _boxes(shape, a, b):
                    assert target[index].size == count
                    target[index] = np.arange(start, start + count).reshape(target[index].shape)
                    covered += count
                flat = target.reshape(-1)
                assert covered == b - a and (flat[a:b] == np.arange(a, b)).all()
                assert (np.delete(flat, range(a, b)) == -1).all()


@pytest.mark.parametrize("roots", [1, 3])
def test_round_trip(tmp_path, tiny, roots):
    _, layout = tiny
    model = np.random.default_rng(0).standard_normal(layout.numel).astype(np.float32)
    outer = {"m": model * 2, "v": model * 3}
    path = _write(tmp_path, 4, layout, model, outer, roots)
    assert (tmp_path / "latest").read_text().strip() == path.name and not list(tmp_path.glob(".*"))
    summary = checkpoint.verify(path)
    assert (summary.round, summary.tokens, summary.roots, summary.outer_state) == (4, 1234, roots, ["m", "v"])
    assert summary.layout == layout
    np.testing.assert_array_equal(checkpoint.read_flat(path, layout, "model"), model)
    np.testing.assert_array_equal(checkpoint.read_flat(path, layout, "outer/v", 100, 5000), model[100:5000] * 3)
    with h5py.File(path) as h5:  # plain h5py: one dataset per parameter in its own shape
        assert set(h5["model"]) == {s.name for s in layout.slots}
        weight = h5["model/model.layers.1.mlp.down_proj.weight"]
        slot = next(s for s in layout.slots if s.name == "model.layers.1.mlp.down_proj.weight")
        assert weight.shape == slot.shape and weight.is_virtual == (roots > 1)
        np.testing.assert_array_equal(weight[()].reshape(-1), model[slot.offset:slot.offset + slot.numel])


def test_damage_is_named_and_resume_falls_back(tmp_path, tiny):
    _, layout = tiny
    model = np.ones(layout.numel, np.float32)
    for round_ in (1, 2, 3):
        _write(tmp_path, round_, layout, model * round_, {})
    _flip_byte_in(tmp_path / "round_00003.h5", "model/lm_head.weight")
    with pytest.raises(CheckpointError, match=r"round_00003.h5: /model/lm_head.weight: checksum mismatch"):
        checkpoint.verify(tmp_path / "round_00003.h5")
    data = (tmp_path / "round_00002.h5").read_bytes()
    (tmp_path / "round_00002.h5").write_bytes(data[:len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated or damaged"):
        checkpoint.verify(tmp_path / "round_00002.h5")
    skipped = []
    chosen = checkpoint.resolve(tmp_path, report=skipped.append)
    assert chosen.round == 1 and len(skipped) == 2
    assert "round_00003.h5" in skipped[0] and "checksum mismatch" in skipped[0] and "round_00002.h5" in skipped[1]
    result = mpifed("ckpt", "verify", str(tmp_path / "round_00003.h5"))
    assert result.returncode == 1 and "/model/lm_head.weight: checksum mismatch" in result.stderr
    assert mpifed("ckpt", "verify", str(tmp_path / "round_00001.h5")).returncode == 0


def test_pruning_counts_only_rounds_up_to_the_one_just_published(tmp_path, tiny):
    """A later file (another run's, or damaged) is neither counted as newer nor deleted: counting it
    once deleted every round that verified and left `latest` naming a deleted file."""
    _, layout = tiny
    for round_ in (1, 2, 3, 4):
        _write(tmp_path, round_, layout, np.full(layout.numel, round_, np.float32), {})
    (tmp_path / "round_00009.h5").write_bytes(b"not a checkpoint")
    (tmp_path / "round_x.h5").write_bytes(b"a user's file")  # not a round's: never parsed, never deleted
    retention.prune(tmp_path, 2, newest=4)
    assert sorted(p.name for p in tmp_path.glob("round_*")) == ["round_00003.h5", "round_00004.h5",
                                                              "round_00009.h5", "round_x.h5"]
    retention.prune(tmp_path, 1, newest=4)
    assert checkpoint.verify(tmp_path / "round_00004.h5").round == 4
    assert (tmp_path / "latest").read_text().strip() == "round_00004.h5"
    assert not (tmp_path / "round_00003.h5").exists() and (tmp_path / "round_00009.h5").exists()


@pytest.mark.slow
def test_a_damaged_later_file_is_set_aside_and_never_costs_a_good_round(tmp_path):
    """The issue's reproduction: a damaged round_00009.h5 in the folder, keep = 1, --resume auto. The
    resume skips it with one line and moves it aside (its bytes kept); the run trains on and keeps its
    newest round, which `latest` names. A round whose metadata was edited after writing is skipped too.
    """
    first = mpifed("simulate", "--rounds", "2", "--local-steps", "2", "--out", "run", cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    damaged = b"\x89HDF\r\n\x1a\n" + bytes(range(256)) * 8
    (tmp_path / "run" / "round_00009.h5").write_bytes(damaged)
    per_round = checkpoint.verify(tmp_path / "run" / "round_00001.h5").tokens
    with h5py.File(tmp_path / "run" / "round_00002.h5", "r+") as h5:  # a valid-looking edit: read as such before
        h5.attrs["tokens"] = 10**9
    (tmp_path / "run" / ".round_00001.fac-f1.h5.tmp").write_bytes(b"what a killed writer left")
    result = mpifed("simulate", "--rounds", "4", "--local-steps", "2", "--out", "run", "--resume", "auto",
                    "--set", "checkpoint.keep=1", cwd=tmp_path)
    assert result.returncode == 0, f"{result.stdout[-2000:]}\n{result.stderr}"
    assert "mpifed: skipping checkpoint round_00002.h5: " in result.stdout and "content digest" in result.stdout
    assert "resuming from run/round_00001.h5 (round 1," in result.stdout, result.stdout[-2000:]
    assert (f"mpifed: removed 1 unpublished temporary file(s) an interrupted job left in run: "
            ".round_00001.fac-f1.h5.tmp") in result.stdout
    skipped = [line for line in result.stdout.splitlines() if "round_00009.h5" in line]
    assert len(skipped) == 1 and skipped[0].startswith("mpifed: skipping checkpoint round_00009.h5: ")
    assert skipped[0].endswith("moved aside to round_00009.h5.damaged")
    assert (tmp_path / "run" / "round_00009.h5.damaged").read_bytes() == damaged
    assert [p.name for p in checkpoint.main_files(tmp_path / "run")] == ["round_00004.h5"]
    newest = checkpoint.verify(tmp_path / "run" / "round_00004.h5")
    assert newest.round == 4 and newest.tokens == 4 * per_round  # nothing of the edited round trained on
    assert (tmp_path / "run" / "latest").read_text().strip() == "round_00004.h5"


def test_only_the_temporary_files_of_published_rounds_are_swept(tmp_path):
    """What a killed job left is removed at the next start; a write in flight (a later round than any
    published: another facility's, sharing the folder) is not."""
    hub, site = tmp_path / "hub", tmp_path / "site"
    for folder, names in [(hub, ["round_00001.h5", "round_00002.h5", ".round_00002.seg-1.h5.tmp",
                                 ".round_00001.fac-b.h5.tmp", ".round_00003.h5.tmp", ".round_00003.fac-a.h5.tmp"]),
                          (site, ["round_00002.fac-b.h5", ".round_00002.fac-b.h5.tmp", ".round_00001.fac-c.h5.tmp",
                                  ".round_00003.fac-b.h5.tmp", ".round_x.h5.tmp"])]:
        folder.mkdir()
        for name in names:
            (folder / name).write_bytes(b"x")
    assert retention.sweep_unpublished(hub, "a") == [".round_00001.fac-b.h5.tmp", ".round_00002.seg-1.h5.tmp"]
    assert retention.sweep_unpublished(site, "b") == [".round_00002.fac-b.h5.tmp"]
    assert sorted(p.name for p in hub.iterdir()) == [".round_00003.fac-a.h5.tmp", ".round_00003.h5.tmp",
                                                     "round_00001.h5", "round_00002.h5"]
    assert sorted(p.name for p in site.iterdir()) == [".round_00001.fac-c.h5.tmp", ".round_00003.fac-b.h5.tmp",
                                                      ".round_x.h5.tmp", "round_00002.fac-b.h5"]


needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="mounting a small filesystem needs root")


@pytest.fixture
def small_disk(tmp_path):
    """A 4 MiB filesystem of its own: a checkpoint folder that fills up (or is made read-only)."""
    folder = tmp_path / "disk"
    folder.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(folder)], check=True)
    yield folder
    subprocess.run(["umount", "-l", str(folder)], check=False)


@needs_root
def test_a_read_only_folder_refuses_a_round_in_one_line_and_keeps_the_last(small_disk, tiny):
    _, layout = tiny
    model = np.ones(layout.numel, np.float32)
    _write(small_disk, 1, layout, model, {})
    subprocess.run(["mount", "-o", "remount,ro", str(small_disk)], check=True)
    with pytest.raises(WriteFailed) as refused:
        _write(small_disk, 2, layout, model * 2, {})
    line = str(refused.value)
    assert line.startswith(f"checkpoint.dir {small_disk}: cannot write round_00002.h5 (Read-only file system); ")
    assert "\n" not in line and "continue with --resume auto" in line
    with pytest.raises(WriteFailed, match=r"cannot write round_00002.fac-f0.h5 \(Read-only file system\)"):
        checkpoint.part_writer(small_disk, 2, "f0", {"ranks": 1}, {}, {"optimizer/exp_avg": layout.numel})
    assert sorted(p.name for p in small_disk.iterdir()) == ["latest", "round_00001.h5"]
    assert checkpoint.verify(small_disk / "round_00001.h5").round == 1


@needs_root
@pytest.mark.slow
def test_a_full_disk_ends_the_run_in_one_line_and_leaves_nothing_half_written(small_disk, tmp_path):
    """Issue 32 item 5: a full disk while a round is written gave a 59-line traceback and left two
    `.tmp` files. Now: one line naming the folder, the bytes needed and free; the rounds published
    before are intact and `latest` names the newest of them."""
    result = mpifed("simulate", "--facilities", "1", "--ranks-per-facility", "2", "--rounds", "8", "--local-steps",
                    "2", "--out", str(small_disk), cwd=tmp_path)
    output = result.stdout + result.stderr
    assert result.returncode == 1, output
    said = [line for line in output.splitlines() if "cannot write" in line]
    assert len(said) == 1, output
    assert re.search(rf"error: checkpoint.dir {small_disk}: cannot write round_\d{{5}}(\.fac-f0)?\.h5 \(No space "
                     r"left on device\); the file needs about [\d,]+ bytes, [\d,]+ bytes are free; ", said[0]), said
    assert "Traceback" not in output
    assert not [p.name for p in small_disk.iterdir() if p.name.startswith(".")]
    trained = [int(line.split()[1].split("/")[0]) for line in result.stdout.splitlines() if line.startswith("round")]
    newest = (small_disk / "latest").read_text().strip()
    assert 1 <= checkpoint.verify(small_disk / newest).round == trained[-1] < 8


def test_damaged_or_missing_segment_file(tmp_path, tiny):
    _, layout = tiny
    model = np.arange(layout.numel, dtype=np.float32)
    path = _write(tmp_path, 1, layout, model, {"momentum": model}, roots=2)
    _flip_byte_in(tmp_path / "round_00001.seg-1.h5", "outer/momentum")
    with pytest.raises(CheckpointError, match=r"seg-1.h5: /outer/momentum: checksum mismatch"):
        checkpoint.verify(path)
    (tmp_path / "round_00001.seg-1.h5").unlink()
    with pytest.raises(CheckpointError, match=r"seg-1.h5: missing"):
        checkpoint.verify(path)


def test_a_streamed_part_reads_back_and_one_missing_ranges_is_named(tmp_path):
    numel, bucket = 10_000, 3_000
    exp_avg = np.random.default_rng(1).standard_normal(numel).astype(np.float32)
    small = {"ranks/data": np.array([[0, 5], [1, 7]], np.int64)}
    writer = checkpoint.part_writer(tmp_path, 2, "f0", {"ranks": 2}, small, {"optimizer/exp_avg": numel})
    with pytest.raises(ValueError, match="pieces come in order"):
        writer.write("optimizer/exp_avg", bucket, exp_avg[bucket:2 * bucket])
    for lo in range(0, numel, bucket):  # in buckets, as a facility's leader receives them
        writer.write("optimizer/exp_avg", lo, exp_avg[lo:lo + bucket])
    path = writer.close().commit()
    checkpoint.check_part(path, checkpoint.part_digest(path), numel=numel)
    arrays, flat = checkpoint.read_part(path)
    assert flat == ["optimizer/exp_avg"] and arrays["ranks/data"].tolist() == [[0, 5], [1, 7]]
    with h5py.File(path) as h5:  # an independent reader sees the same values
        np.testing.assert_array_equal(h5["optimizer/exp_avg"][()], exp_avg)
    np.testing.assert_array_equal(checkpoint.read_range(path, "optimizer/exp_avg", 2500, 7100), exp_avg[2500:7100])
    # a part whose flat array covers less than the model (its hash made to match): named, not misread
    with h5py.File(path, "r+") as h5:
        del h5["optimizer/exp_avg"]
        h5["optimizer/exp_avg"] = exp_avg[:6000]
        h5["optimizer/exp_avg"].attrs[checkpoint.HASH] = array_hash(exp_avg[:6000])
    with pytest.raises(CheckpointError, match=r"f0.h5: its attributes or array hashes changed after it was written"):
        checkpoint.check_part(path)
    with h5py.File(path, "r+") as h5:  # and its content digest remade, as a whole file of another run would be
        h5.attrs[DIGEST] = content_digest(h5)
    checkpoint.check_part(path)
    with pytest.raises(CheckpointError, match=r"f0.h5: /optimizer/exp_avg: 6,000 values of the model's 10,000 "
                                              r"\(the part is missing ranges"):
        checkpoint.check_part(path, numel=numel)


def test_killed_writer_never_publishes_a_broken_file(tmp_path):
    layout_numel = 40_000_000  # ~1 s to write, verify and publish both arrays on this machine
    outcomes = []
    for delay in (0.1, 0.3, 0.6):
        folder = tmp_path / f"d{delay}"
        folder.mkdir()
        small = FlatLayout((ParamSlot("a", (4,), "float32", 0),))
        checkpoint.publish(checkpoint.write_main(folder, 1, dict(ATTRS, model_config="{}"), small, [(0, 4)], [], [],
                                                 model=np.ones(4, np.float32), outer={}))
        proc = subprocess.Popen([sys.executable, str(WORKERS / "write_worker.py"), str(folder), str(layout_numel)],
                                stdout=subprocess.PIPE, env=rank_env())
        proc.stdout.readline()  # "writing"
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        latest = folder / (folder / "latest").read_text().strip()
        assert checkpoint.verify(latest).round in (1, 2)  # whatever it names is whole
        if latest.name == "round_00001.h5":
            assert not (folder / "round_00002.h5").exists() or checkpoint.resolve(folder).round == 2
        outcomes.append((latest.name, sorted(p.name for p in folder.iterdir())))
    # the earliest kill really landed mid-write: a temporary was left, and latest stayed on round 1
    assert outcomes[0][0] == "round_00001.h5" and ".round_00002.h5.tmp" in outcomes[0][1], outcomes


def test_export_loads_with_the_same_logits(tmp_path, tiny):
    model, layout = tiny
    flat = np.random.default_rng(3).standard_normal(layout.numel).astype(np.float32) * 0.05
    path = _write(tmp_path, 1, layout, flat, {}, config_json=model.config.to_json_string())
    result = mpifed("ckpt", "export", str(tmp_path), str(tmp_path / "hf"))
    assert result.returncode == 0, result.stderr
    from transformers import AutoModelForCausalLM

    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", local_files_only=True)
    with torch.no_grad():
        for name, param in model.named_parameters():
            param.copy_(torch.from_numpy(checkpoint.read_flat(path, layout, "model")[
                next(s for s in layout.slots if s.name == name).offset:][:param.numel()].reshape(param.shape)))
        tokens = torch.arange(40).reshape(2, 20) % 256
        np.testing.assert_allclose(loaded(tokens).logits.numpy(), model.eval()(tokens).logits.numpy(), rtol=0, atol=1e-5)
    info = mpifed("ckpt", "inspect", str(tmp_path))
    assert info.returncode == 0 and "round        1" in info.stdout and f"{layout.numel:,} parameters" in info.stdout


def test_an_export_of_the_embedded_text_carries_its_tokenizer_and_the_users_umask(tmp_path, tiny):
    """Issue 32 item 9: the export of a model trained on the embedded text had no tokenizer
    (AutoTokenizer failed), and its weights were mode 0600 whatever the umask."""
    model, layout = tiny
    _write(tmp_path, 1, layout, np.zeros(layout.numel, np.float32), {}, config_json=model.config.to_json_string())
    out = tmp_path / "hf"
    result = run(["sh", "-c", f'umask 027 && exec "{sys.executable}" -m mpifed ckpt export "{tmp_path}" "{out}"'],
                 timeout=120)
    assert result.returncode == 0, result.stderr
    assert {p.name: oct(p.stat().st_mode & 0o777) for p in out.iterdir()} == dict.fromkeys(
        (p.name for p in out.iterdir()), "0o640")
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(out), local_files_only=True)
    for text in ["Return the JSON string.\n", "naïve café — ∑ 日本語 🙂", "".join(map(chr, range(1, 128)))]:
        ids = tokenizer(text)["input_ids"]
        assert ids == list(text.encode("utf-8")) and tokenizer.decode(ids) == text  # the corpus's own ids
    assert max(ids) < VOCAB_SIZE == model.config.vocab_size
