"""The run configuration: validation lists every problem, --set reaches every key, TOML round-trips."""
import dataclasses
import re

import pytest

from conftest import mpifed

from mpifed import config, configfile, preflight
from mpifed.config import ConfigError, RunConfig


def test_defaults_are_two_facilities_of_two_ranks():
    cfg = RunConfig()
    assert [(f.name, f.ranks) for f in cfg.facility] == [("f0", 2), ("f1", 2)]
    assert cfg.total_ranks == 4 and cfg.federation.outer == "fedavg" and cfg.federation.roots == 1


def test_every_problem_is_reported_at_once():
    with pytest.raises(ConfigError) as err:
        configfile.from_dict({"train": {"lr": -1.0, "local_steps": 0}, "federation": {"outer": "sgd"}})
    message = str(err.value)
    assert "train.lr" in message and "train.local_steps" in message and "federation.outer" in message
    assert "fedavg" in message  # names the valid choice
    assert "\n" not in message


def test_unknown_key_lists_valid_keys():
    with pytest.raises(ConfigError, match=r"train\.batch: unknown key; valid keys: local_steps, micro_batch"):
        configfile.from_dict({"train": {"batch": 4}})
    with pytest.raises(ConfigError, match=r"optim: unknown section; valid sections: model, data"):
        configfile.from_dict({"optim": {}})


@pytest.mark.parametrize("name", ["a\n", "a\ntouch PWNED", "1a", "a b", "a/b", "é"])
def test_a_facility_name_is_matched_as_a_whole(name, tmp_path):
    """A name reaches file names and batch scripts: `$` in a pattern would also match before a final
    line break, so "a\n" once passed. The refusal is one line, the name shown escaped."""
    with pytest.raises(ConfigError) as refused:
        configfile.from_dict({"facility": [{"name": name}, {"name": "b"}]})
    assert f"facility.0.name: {name!r} is not a valid name" in str(refused.value)
    assert "\n" not in str(refused.value)
    path = tmp_path / "c.toml"
    path.write_text(configfile.dump_toml(configfile.from_dict({})).replace('name = "f0"', f"name = {name!r}"))
    result = mpifed("simulate", "--config", str(path), "--dry-run")
    assert result.returncode == 2 and result.stderr.count("\n") == 1 and "is not a valid name" in result.stderr


@pytest.mark.parametrize("text", ["run🙂", 'a"b\\c', "x\ny\t\x7f\x01é", "日本/データ", "$SCRATCH/{}"])
def test_any_text_round_trips_through_mpifed_toml(text, tmp_path):
    """Issue 32 item 7: a path with an emoji was written with JSON's surrogate-pair escapes, which TOML
    does not read back."""
    cfg = configfile.from_dict({"checkpoint": {"dir": text}, "data": {"path": ""}})
    path = tmp_path / "c.toml"
    path.write_text(configfile.dump_toml(cfg), encoding="utf-8")
    assert configfile.from_dict(configfile.load(path)).checkpoint.dir == text


def test_a_path_that_is_not_utf8_is_one_line_and_nothing_is_written(tmp_path):
    out = (str(tmp_path).encode() + b"/run\xff").decode("utf-8", "surrogateescape")
    with pytest.raises(ConfigError, match=r"is not UTF-8 text, which a TOML file must hold; rename it"):
        configfile.dump_toml(configfile.from_dict({"checkpoint": {"dir": out}}))
    result = mpifed("simulate", "--out", out, "--rounds", "1")
    assert result.returncode == 2 and result.stderr.count("\n") == 1 and "not UTF-8 text" in result.stderr
    assert list(tmp_path.iterdir()) == []


def test_wrong_types_are_named():
    with pytest.raises(ConfigError, match=r"train.local_steps: expected int, got str"):
        configfile.from_dict({"train": {"local_steps": "ten"}})
    with pytest.raises(ConfigError, match=r"train.local_steps: expected int, got bool"):
        configfile.from_dict({"train": {"local_steps": True}})
    assert configfile.from_dict({"train": {"lr": 1}}).train.lr == 1.0  # an int is a fine float


def test_facility_rules():
    with pytest.raises(ConfigError, match="names must be unique"):
        configfile.from_dict({"facility": [{"name": "a"}, {"name": "a"}]})
    with pytest.raises(ConfigError, match=r"federation.roots: 3 roots per facility, but the smallest facility has 2"):
        configfile.from_dict({"federation": {"roots": 3}, "facility": [{"name": "a", "ranks": 4}, {"name": "b", "ranks": 2}]})
    with pytest.raises(ConfigError, match=r"facility.a.engine: unknown engine 'magic'"):
        configfile.from_dict({"facility": [{"name": "a", "engine": "magic"}]})
    with pytest.raises(ConfigError, match="at least one"):
        configfile.from_dict({"facility": []})


def test_set_reaches_sections_and_facilities():
    data = configfile.apply_sets({}, ["train.lr=3e-4", "model.preset=llama-small", "facility.f1.ranks=3",
                                  "facility.0.name=leonardo", "checkpoint.dir=out/x"])
    cfg = configfile.from_dict(data)
    assert cfg.train.lr == pytest.approx(3e-4)
    assert cfg.model.preset == "llama-small"  # bare strings need no quotes
    assert [(f.name, f.ranks) for f in cfg.facility] == [("leonardo", 2), ("f1", 3)]
    assert cfg.checkpoint.dir == "out/x"


def test_set_errors_list_valid_choices():
    with pytest.raises(ConfigError, match=r"unknown key 'train.nope'; valid keys: train.local_steps"):
        configfile.apply_sets({}, ["train.nope=1"])
    with pytest.raises(ConfigError, match=r"unknown section 'nope'"):
        configfile.apply_sets({}, ["nope.x=1"])
    with pytest.raises(ConfigError, match=r"no facility 'zz'; facilities: f0, f1"):
        configfile.apply_sets({}, ["facility.zz.ranks=1"])
    with pytest.raises(ConfigError, match="expected section.key=value"):
        configfile.apply_sets({}, ["train.lr"])


def test_dump_toml_round_trips(tmp_path):
    cfg = configfile.from_dict(configfile.apply_sets({}, ["train.lr=2.5e-05", "facility.f0.ranks=3", "metrics.file=a \"b\".jsonl"]))
    path = tmp_path / "c.toml"
    path.write_text(configfile.dump_toml(cfg))
    assert configfile.from_dict(configfile.load(path)) == cfg


def test_load_names_the_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        configfile.load(tmp_path / "missing.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[train\n")
    with pytest.raises(ConfigError, match=str(bad)):
        configfile.load(bad)


def test_every_field_is_documented():
    """Each key carries a docstring in config.py (the reference a user reads)."""
    import inspect

    source = inspect.getsource(config)
    for section in [*config.SECTIONS.values(), *config.ENGINE_SECTIONS.values(), config.FacilityConfig]:
        for f in dataclasses.fields(section):
            block = source.split(f"class {section.__name__}")[1]
            assert f'    {f.name}: ' in block and '"""' in block.split(f"    {f.name}: ")[1].split("\n")[1], f.name


def test_federation_settings_are_checked_together():
    with pytest.raises(ConfigError) as err:
        configfile.from_dict(configfile.apply_sets({}, ["federation.compress=zip", "federation.outer_momentum=1.5",
                                                "federation.sample=0.5", "federation.min_participants=2"]))
    message = str(err.value)
    assert "federation.compress: unknown compression 'zip'; choose one of none, bf16, int8, int4, int2, topk" in message
    assert "federation.outer_momentum: must be >= 0 and < 1" in message
    assert "federation.min_participants: 2 can never be met: federation.sample = 0.5 draws 1 of 2" in message
    with pytest.raises(ConfigError, match=r"federation.outer_warmup: applies to fedavgm and diloco"):
        configfile.from_dict(configfile.apply_sets({}, ["federation.outer=fedadam", "federation.outer_warmup=3"]))
    cfg = configfile.from_dict(configfile.apply_sets({}, ["federation.outer=diloco", "federation.outer_lr=0.5"]))
    assert cfg.federation.outer_lr == 0.5 and cfg.federation.outer_momentum is None  # unset: the default


@pytest.mark.parametrize("sets, line", [
    (["federation.fragments=5", "train.local_steps=4"],
     "federation.fragments: 5 fragments need at least as many local steps (train.local_steps = 4)"),
    (["federation.fragments=0"], "federation.fragments: must be >= 1 (got 0)"),
    (["federation.topk_fraction=0"], "federation.topk_fraction: must be > 0 and <= 1 (got 0.0)"),
    (["federation.topk_fraction=1.5"], "federation.topk_fraction: must be > 0 and <= 1 (got 1.5)"),
    (["federation.overlap=eager"], "federation.overlap: unknown overlap mode 'eager'; choose one of none, delayed"),
    (["federation.overlap=delayed", "federation.sample=0.5"],
     "federation.sample: 0.5 with federation.overlap = 'delayed' and federation.fragments = 1: a facility that sits a "
     "round out would leave a streamed exchange without its update"),
    (["federation.fragments=2", "federation.sample=0.5"], "federation.sample: 0.5 with federation.overlap = 'none' and "
                                                           "federation.fragments = 2"),
    (["federation.overlap_steps=2"], "federation.overlap_steps: 2 applies with federation.overlap = 'delayed' (got "
                                     "'none'); set overlap = 'delayed' or overlap_steps = 0"),
    (["federation.overlap=delayed", "federation.overlap_steps=-1"], "federation.overlap_steps: must be >= 0 (got -1)"),
    (["federation.overlap=delayed", "federation.fragments=3", "train.local_steps=10", "federation.overlap_steps=4"],
     "federation.overlap_steps: 4 steps in flight, but sync points come every 3 steps (train.local_steps = 10, "
     "federation.fragments = 3): one exchange must land before the next is posted"),
])
def test_streaming_settings_that_cannot_be_honoured_are_refused(sets, line):
    with pytest.raises(ConfigError) as err:
        configfile.from_dict(configfile.apply_sets({}, sets))
    assert line in str(err.value)


def test_engine_tables_parse_set_and_round_trip(tmp_path):
    data = {"facility": [{"name": "leonardo", "ranks": 4, "engine": "fsdp", "fsdp": {"replicas": 2}},
                         {"name": "lumi", "ranks": 2, "engine": "deepspeed", "deepspeed": {"zero_stage": 3}}]}
    cfg = configfile.from_dict(configfile.apply_sets(data, ["facility.lumi.deepspeed.zero_stage=1",
                                                    "facility.leonardo.fsdp.mixed_precision=bf16"]))
    assert cfg.facility[0].fsdp.replicas == 2 and cfg.facility[0].fsdp.mixed_precision == "bf16"
    assert cfg.facility[1].deepspeed.zero_stage == 1
    path = tmp_path / "c.toml"
    path.write_text(configfile.dump_toml(cfg))
    assert "deepspeed = { zero_stage = 1" in path.read_text()
    assert configfile.from_dict(configfile.load(path)) == cfg


def test_engine_table_errors_name_the_key():
    with pytest.raises(ConfigError, match=r"facility.0.fsdp.shards: unknown key; valid keys: replicas"):
        configfile.from_dict({"facility": [{"name": "a", "fsdp": {"shards": 2}}]})
    with pytest.raises(ConfigError, match=r"unknown key 'stage'; valid keys: facility.a.deepspeed.zero_stage"):
        configfile.apply_sets({"facility": [{"name": "a"}]}, ["facility.a.deepspeed.stage=3"])
    with pytest.raises(ConfigError, match=r"deepspeed.config: file /no/ds.json does not exist"):
        preflight.checked(configfile.from_dict(
            {"facility": [{"name": "a", "engine": "deepspeed", "deepspeed": {"config": "/no/ds.json"}}]}))


def test_training_settings_are_checked():
    with pytest.raises(ConfigError) as err:
        configfile.from_dict({"train": {"schedule": "linear", "grad_accum": 0, "beta2": 1.0, "min_lr": 1.0, "lr": 0.1,
                                    "inner_state": "drop", "device": "tpu"}, "eval": {"every": 0},
                          "model": {"attention": "flash", "dtype": "fp8"}})
    for key in ("train.schedule", "train.grad_accum", "train.beta2", "train.min_lr", "train.inner_state",
                "train.device", "eval.every", "model.attention", "model.dtype"):
        assert key in str(err.value)


def test_the_inner_optimizer_and_its_momentum_are_checked():
    for train, facility, said in [
            ({"optimizer": "lion"}, {}, "train.optimizer: unknown optimizer 'lion'; choose one of adamw, sgd"),
            ({"momentum": 0.9}, {}, "train.momentum: applies to train.optimizer = sgd (AdamW's momentum is train.beta1)"),
            ({"optimizer": "sgd", "momentum": 1.0}, {}, "train.momentum: must be >= 0 and < 1 (got 1.0)"),
            ({"optimizer": "sgd"}, {"engine": "deepspeed"}, "train.optimizer: sgd runs on the replica and fsdp "
                                                            "engines; the deepspeed engine runs AdamW")]:
        with pytest.raises(ConfigError, match=re.escape(said)):
            configfile.from_dict({"train": train, "facility": [{"name": "a", "ranks": 1, **facility}]})
    cfg = configfile.from_dict({"train": {"optimizer": "sgd", "momentum": 0.5}})
    assert (cfg.train.optimizer, cfg.train.momentum, cfg.train.state_arrays) == ("sgd", 0.5, 1)
    assert configfile.from_dict({"train": {"optimizer": "sgd"}}).train.state_arrays == 0
    assert configfile.from_dict({}).train.state_arrays == 2


def test_an_embedded_text_partition_needs_data_partitions_above_it():
    """facility.partition picks a partition of data.path, or of the embedded text cut into
    data.partitions (what separate launches pin, so that a facility keeps its share whoever is in)."""
    two = {"facility": [{"name": "a", "ranks": 1, "partition": 2}, {"name": "b", "ranks": 1}]}
    with pytest.raises(ConfigError, match=r"facility.partition: applies with data.path, or to the embedded text "
                                          r"with data.partitions"):
        configfile.from_dict(two)
    with pytest.raises(ConfigError, match=r"data.partitions = 2; a facility's partition must be below it"):
        configfile.from_dict({**two, "data": {"partitions": 2}})
    cfg = configfile.from_dict({**two, "data": {"partitions": 3}})
    assert [cfg.partition_of(i) for i in range(2)] == [2, 1]
