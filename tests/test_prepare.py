"""`mpifed data prepare` on real text (the standard library's documentation): the trained tokenizer,
the manifest's counts against an independent tokenization, disjoint by-source partitions, weighted IID
partitions, SFT labels token by token, resuming mid-epoch, and one clear error per bad input."""
import json
import re
from collections import Counter

import datasets
import numpy as np
import pytest
from transformers import AutoTokenizer

from conftest import mpifed
from mpifed.data import corpus as data
from mpifed.data.prepare import IGNORE, PrepareOptions, prepare


def _rows(folder, split):
    return np.asarray(datasets.load_from_disk(str(folder / split)).with_format("numpy")["input_ids"])


def _documents(corpus_dir):
    """{source: [texts]} as the reader should see them: each file one document, its top folder the source."""
    out = {}
    for file in sorted(corpus_dir.rglob("*.txt")):
        out.setdefault(file.relative_to(corpus_dir).parts[0], []).append(file.read_text(encoding="utf-8"))
    return out


def test_prepare_shows_progress_and_writes_a_manifest(bpe_data):
    folder, result = bpe_data
    for stage in ("read ", "training a byte-level BPE", "packed ", "wrote "):
        assert f"mpifed data: {stage}" in result.stderr
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["kind"] == "pretrain" and manifest["seq_len"] == 64 and manifest["vocab_size"] == 1000
    assert [p["name"] for p in manifest["partitions"]] == ["partition_0", "partition_1", "partition_2"]


def test_prepare_a_few_megabytes(corpus_dir, tmp_path):
    text = data.stdlib_text()  # the demo's whole corpus, ~2 MB, in four files beside the package folders
    (tmp_path / "in").mkdir()
    for i in range(4):
        (tmp_path / "in" / f"part{i}.txt").write_text(text[i * len(text) // 4:(i + 1) * len(text) // 4])
    result = mpifed("data", "prepare", str(tmp_path / "in"), str(corpus_dir), "--train-bpe", "4000", "--seq-len",
                    "256", "--partitions", "4", "--num-proc", "2", "--out", str(tmp_path / "out"))
    assert result.returncode == 0, result.stderr
    read = re.search(r"mpifed data: read (\d+) documents \(([\d.]+) MB\)", result.stderr)
    assert int(read[1]) == 4 + len(list(corpus_dir.rglob("*.txt"))) and float(read[2]) > 2
    assert "tokenizing" in result.stderr and "mpifed data: wrote" in result.stderr
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["total_tokens"] > 500_000 and len(manifest["partitions"]) == 4


def test_trained_bpe_round_trips_text(bpe_data, corpus_dir):
    tokenizer = AutoTokenizer.from_pretrained(str(bpe_data[0] / "tokenizer"), local_files_only=True)
    assert len(tokenizer) == 1000
    samples = ["\n\n".join(f.read_text(encoding="utf-8") for f in sorted(corpus_dir.rglob("*.txt"))[:20]),
               "  Leading spaces,\ttabs,\n\nblank lines; naïve café — ∑ 日本語 🙂 and trailing space "]
    for text in samples:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert tokenizer.decode(ids) == text
    english = tokenizer(samples[0], add_special_tokens=False)["input_ids"]
    assert len(english) < len(samples[0].encode()) / 2.5  # it learned merges: ~3.5 bytes a token


def test_manifest_counts_match_the_data_and_an_independent_tokenization(bpe_data, corpus_dir):
    folder = bpe_data[0]
    manifest = json.loads((folder / "manifest.json").read_text())
    parts = manifest["partitions"]
    assert sum(p["tokens"] for p in parts) == manifest["total_tokens"]
    for p in parts:
        rows = _rows(folder, p["name"])
        assert rows.shape == (p["sequences"], 64) and p["tokens"] == rows.size
    assert _rows(folder, "validation").size == manifest["validation"]["tokens"]
    # every token of the input is in a partition, the validation split or a dropped tail
    tokenizer = AutoTokenizer.from_pretrained(str(folder / "tokenizer"), local_files_only=True)
    docs = [t for texts in _documents(corpus_dir).values() for t in texts]
    independent = sum(len(tokenizer(t, add_special_tokens=False)["input_ids"]) + 1 for t in docs)  # + end of text
    assert manifest["total_tokens"] + manifest["validation"]["tokens"] + manifest["dropped_tokens"] == independent
    assert manifest["dropped_tokens"] < 3 * 64  # at most one ragged tail per partition


def test_by_source_partitions_hold_disjoint_sources(bpe_data, corpus_dir):
    folder = bpe_data[0]
    manifest = json.loads((folder / "manifest.json").read_text())
    groups = [set(p["sources"]) for p in manifest["partitions"]]
    assert set.union(*groups) == set(_documents(corpus_dir)) and sum(map(len, groups)) == len(set.union(*groups))
    # each sequence is a piece of its own sources' token stream, and of no other partition's
    tokenizer = AutoTokenizer.from_pretrained(str(folder / "tokenizer"), local_files_only=True)
    eos = tokenizer.eos_token_id
    docs = _documents(corpus_dir)
    streams = [b"".join(np.array(tokenizer(t, add_special_tokens=False)["input_ids"] + [eos], np.int32).tobytes()
                        for s in sorted(g) for t in docs[s]) for g in groups]
    for i, p in enumerate(manifest["partitions"]):
        for row in _rows(folder, p["name"])[::7]:
            found = [j for j, stream in enumerate(streams) if row.astype(np.int32).tobytes() in stream]
            assert found == [i]


def test_iid_partitions_follow_weights_and_do_not_overlap(bpe_data, corpus_dir, tmp_path):
    out = tmp_path / "iid"
    manifest = prepare(PrepareOptions(inputs=(corpus_dir,), out=out, seq_len=64, partitions=2, weights=(3.0, 1.0),
                                      tokenizer=bpe_data[0] / "tokenizer", val_fraction=0.1), say=lambda _: None)
    sizes = [p["sequences"] for p in manifest["partitions"]]
    assert abs(sizes[0] - 3 * sizes[1]) <= 3
    assert abs(manifest["validation"]["sequences"] - 0.1 * (sum(sizes) + manifest["validation"]["sequences"])) <= 1
    # every packed sequence is used exactly once: the rows of the partitions and the validation split are,
    # as a multiset, the document stream packed independently (identical text may repeat a row's content)
    tokenizer = AutoTokenizer.from_pretrained(str(bpe_data[0] / "tokenizer"), local_files_only=True)
    stream = [t for f in sorted(corpus_dir.rglob("*.txt"))
              for t in tokenizer(f.read_text(encoding="utf-8"), add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]]
    n = len(stream) // 64
    packed = Counter(np.array(stream[:n * 64], np.int32).reshape(n, 64)[i].tobytes() for i in range(n))
    used = Counter(r.astype(np.int32).tobytes() for s in ("partition_0", "partition_1", "validation")
                   for r in _rows(out, s))
    assert used == packed


def test_resuming_mid_epoch_continues_at_the_next_unseen_sequence(bpe_data):
    partition = data.Prepared(bpe_data[0]).partition(1)  # memory-mapped, rows read as drawn
    first = data.Sampler(partition, rank=1, ranks=2, micro_batch=4, seed=(0, 1, 1))
    drawn = [first.next_batch() for _ in range(5)]
    epoch, position = first.epoch, first.position
    expected = first.next_batch()
    resumed = data.Sampler(partition, rank=1, ranks=2, micro_batch=4, seed=(0, 1, 1))
    resumed.restore(epoch, position)
    got = resumed.next_batch()
    np.testing.assert_array_equal(got, expected)
    earlier = {r.tobytes() for batch in drawn for r in batch}
    assert got.shape == (4, 64) and not earlier & {r.tobytes() for r in got}
    assert all(r.tobytes() in {x.tobytes() for x in _rows(bpe_data[0], "partition_1")[1::2]} for r in got)


SFT_TEXT = """### Human: What does json.dumps return? ### Assistant: A string holding the object in JSON.
### Human: How do I read a file line by line?
### Assistant: Iterate over the open file object; each step gives one line.
### Human: Is tuple mutable? ### Assistant: No. ### Human: And list? ### Assistant: Yes, lists are mutable.
"""


def test_sft_labels_are_ignored_exactly_on_prompt_and_padding(bpe_data, tmp_path):
    jsonl = tmp_path / "pairs.jsonl"
    pairs = [{"prompt": f"### Human: What is item {i} of the list? ### Assistant:", "response": f" It is {i * i}."}
             for i in range(12)]
    jsonl.write_text("".join(json.dumps(p) + "\n" for p in pairs))
    (tmp_path / "chat.txt").write_text(SFT_TEXT)
    tokenizer_dir = bpe_data[0] / "tokenizer"
    out = tmp_path / "sft"
    manifest = prepare(PrepareOptions(inputs=(jsonl, tmp_path / "chat.txt"), out=out, seq_len=32, partitions=1,
                                      tokenizer=tokenizer_dir, sft=True, val_fraction=0.2), say=lambda _: None)
    assert manifest["kind"] == "sft"
    examples = [(p["prompt"], p["response"]) for p in pairs] + [
        ("### Human: What does json.dumps return? ### Assistant:", " A string holding the object in JSON."),
        ("### Human: How do I read a file line by line?\n### Assistant:",
         " Iterate over the open file object; each step gives one line."),
        ("### Human: Is tuple mutable? ### Assistant: No. ### Human: And list? ### Assistant:",
         " Yes, lists are mutable.")]
    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir), local_files_only=True)
    encode = lambda text: tok(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    expected = {}
    for prompt, response in examples:
        if len(encode(prompt)) >= 32:  # no room for a response: dropped
            continue
        ids = (encode(prompt) + encode(response) + [tok.eos_token_id])[:32]
        labels = [IGNORE] * len(encode(prompt)) + ids[len(encode(prompt)):]
        pad = 32 - len(ids)
        expected[tuple(ids + [tok.pad_token_id] * pad)] = labels + [IGNORE] * pad
    rows = 0
    for split in ("partition_0", "validation"):
        ds = datasets.load_from_disk(str(out / split)).with_format("numpy")
        for ids, labels in zip(ds["input_ids"], ds["labels"]):
            assert labels.tolist() == expected[tuple(ids.tolist())]  # token by token
            rows += 1
    assert rows == len(expected) == len(examples) - 1  # the long multi-turn prompt did not fit
    assert manifest["dropped_tokens"] > 0


@pytest.mark.parametrize("args, message", [
    (["EMPTY", "--train-bpe", "500"], "EMPTY: no input in this folder"),
    (["CORPUS", "--train-bpe", "0"], "--train-bpe: a vocabulary of 0 is too small"),
    (["JSONL", "--train-bpe", "500", "--text-field", "body"], "JSONL line 1: no field 'body' (--text-field) (fields: text, tag)"),
    (["JSONL", "--train-bpe", "500", "--split", "by-source", "--source-field", "site"], "JSONL line 1: no field 'site'"),
    (["CORPUS", "--tokenizer", "MISSING"], "--tokenizer MISSING: not a tokenizer folder"),
    (["CORPUS", "--train-bpe", "500", "--weights", "1,2,3"], "--weights: give 2 positive numbers"),
])
def test_bad_input_gives_one_clear_error(args, message, corpus_dir, tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "x.jsonl").write_text(json.dumps({"text": "some words", "tag": "a"}) + "\n")
    names = {"EMPTY": str(tmp_path / "empty"), "CORPUS": str(corpus_dir), "JSONL": str(tmp_path / "x.jsonl"),
             "MISSING": str(tmp_path / "no-such-tokenizer")}
    result = mpifed("data", "prepare", *[names.get(a, a) for a in args], "--out", str(tmp_path / "out"))
    expected = "".join(names.get(part, part) for part in _split_names(message, names))
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
    assert result.stderr.startswith("mpifed data prepare: error: ") and expected in result.stderr
    assert not (tmp_path / "out").exists()


def _split_names(message, names):
    return re.split(f"({'|'.join(names)})", message)


def test_data_path_errors_name_the_folder(bpe_data, tmp_path):
    from mpifed import configfile, preflight
    from mpifed.config import ConfigError

    with pytest.raises(ConfigError, match="holds 3 partitions for 2 facilities; prepare it again with --partitions 2"):
        preflight.checked(configfile.from_dict({"data": {"path": str(bpe_data[0])}}))
    with pytest.raises(ConfigError, match=f"data.path {tmp_path}: not a prepared dataset"):
        preflight.checked(configfile.from_dict({"data": {"path": str(tmp_path)}}))


def _lying_copy(bpe_data, tmp_path, **lies):
    """A copy of the prepared folder whose manifest.json says `lies` over what the data holds."""
    import shutil

    folder = tmp_path / "lying"
    shutil.copytree(bpe_data[0], folder)
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest.update(lies)
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return folder


def test_a_manifest_that_lies_about_its_data_is_named_in_one_line(bpe_data, tmp_path):
    """Issue 32 item 3: a vocab_size too small and a missing partition ended in tracebacks; a seq_len the
    rows do not have trained without a word. Each lie is now one line naming the folder and the split."""
    small = _lying_copy(bpe_data, tmp_path / "vocab", vocab_size=100)
    with pytest.raises(data.DataError, match=rf"data.path {small}: validation: row \d+ holds input_ids \d+, outside "
                                             r"the vocabulary of 100 that manifest.json gives"):
        data.Prepared(small).validation(1000)
    longer = _lying_copy(bpe_data, tmp_path / "seq", seq_len=128)
    with pytest.raises(data.DataError, match=rf"data.path {longer}: partition_1: its rows hold 64 input_ids, "
                                             "manifest.json says seq_len 128"):
        data.Prepared(longer).partition(1)
    gone = _lying_copy(bpe_data, tmp_path / "gone")
    import shutil

    shutil.rmtree(gone / "partition_2")
    with pytest.raises(data.DataError, match=rf"data.path {gone}: partition_2 is missing or unreadable"):
        data.Prepared(gone).partition(2)
    counted = _lying_copy(bpe_data, tmp_path / "count")
    manifest = json.loads((counted / "manifest.json").read_text())
    manifest["partitions"][0]["sequences"] += 5
    (counted / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(data.DataError, match=r"partition_0 holds [\d,]+ sequences, manifest.json says [\d,]+"):
        data.Prepared(counted).partition(0)
    for lie, said in [({"seq_len": "64"}, "seq_len must be a positive integer"),
                      ({"vocab_size": 0}, "vocab_size must be a positive integer"),
                      ({"partitions": []}, "partitions must list each partition"),
                      ({"validation": {"sequences": True}}, "validation must give its number of sequences")]:
        with pytest.raises(data.DataError, match=f"manifest.json: {said}"):
            data.read_manifest(_lying_copy(bpe_data, tmp_path / str(len(said)) / "x", **lie))
    # the whole run: one line and exit code 2, before a step is trained
    result = mpifed("simulate", "--facilities", "3", "--ranks-per-facility", "1", "--rounds", "1", "--local-steps",
                    "1", "--set", f"data.path={small}", "--out", str(tmp_path / "run"))
    said = [line for line in result.stderr.splitlines() if "outside the vocabulary" in line]
    assert result.returncode == 2 and len(said) == 1 and "Traceback" not in result.stderr, result.stderr
    assert not list((tmp_path / "run").glob("round_*"))


def test_skip_bad_leaves_out_and_lists_what_cannot_be_read(corpus_dir, tmp_path):
    """Issue 32 item 9: prepare stopped at the first file it could not parse, with no way past it."""
    import shutil

    inputs = tmp_path / "in"
    shutil.copytree(corpus_dir / "json", inputs / "json")
    (inputs / "notes.jsonl").write_text('{"text": "a good line of text"}\n[1, 2]\n{"text": "another good one"}\n'
                                        '{"body": "no text field"}\nnot json at all\n')
    (inputs / "latin1.txt").write_bytes("café au lait".encode("latin-1"))
    args = ["data", "prepare", str(inputs), "--train-bpe", "300", "--seq-len", "32", "--partitions", "2",
            "--num-proc", "1"]
    stopped = mpifed(*args, "--out", str(tmp_path / "a"))
    assert stopped.returncode == 2 and "latin1.txt: cannot read it as UTF-8 text" in stopped.stderr
    assert not (tmp_path / "a").exists()
    result = mpifed(*args, "--skip-bad", "--out", str(tmp_path / "b"))
    assert result.returncode == 0, result.stderr
    skipped = [line.split("skipped ", 1)[1] for line in result.stderr.splitlines() if "mpifed data:   skipped " in line]
    assert "mpifed data: skipped 4 bad input(s) (--skip-bad):" in result.stderr
    assert [line.split(":")[0].rsplit("/", 1)[-1] for line in skipped] == [
        "latin1.txt", "notes.jsonl line 2", "notes.jsonl line 4", "notes.jsonl line 5"]
    read = re.search(r"read ([\d,]+) documents", result.stderr)
    assert int(read[1].replace(",", "")) == len(list((corpus_dir / "json").rglob("*.txt"))) + 2  # the good lines
    assert json.loads((tmp_path / "b" / "manifest.json").read_text())["total_tokens"] > 0


def test_a_saved_dataset_is_an_input_with_its_source_field(bpe_data, tmp_path):
    rows = {"body": [f"Document {i} of the {site} site: " + "words and more words. " * 20 for i in range(30)
                     for site in ("north", "south", "east")],
            "site": [site for _ in range(30) for site in ("north", "south", "east")]}
    datasets.Dataset.from_dict(rows).save_to_disk(str(tmp_path / "saved"))
    manifest = prepare(PrepareOptions(inputs=(tmp_path / "saved",), out=tmp_path / "out", seq_len=32, partitions=3,
                                      split="by-source", text_field="body", source_field="site",
                                      tokenizer=bpe_data[0] / "tokenizer"), say=lambda _: None)
    assert sorted(s for p in manifest["partitions"] for s in p["sources"]) == ["east", "north", "south"]
    tokenizer = AutoTokenizer.from_pretrained(str(bpe_data[0] / "tokenizer"), local_files_only=True)
    for p in manifest["partitions"]:  # each partition decodes to its own site's documents only
        text = tokenizer.decode(_rows(tmp_path / "out", p["name"]).reshape(-1))
        assert f"the {p['sources'][0]} site" in text
        assert not any(f"the {other} site" in text for other in ("north", "south", "east") if other != p["sources"][0])
