"""Every rank holds only its share of the model (issue 15): the initial model reaches each engine's
shards by range, from the seed or from a model folder's sharded safetensors (checked against the
files read whole by safetensors itself); a sharded rank starts under an address space limit that
leaves no room for one whole copy of the model; `mpifed plan` reports what an independent count of
the parameters gives; bad model folders and plans fail with one line."""
import json
import re

import numpy as np
import pytest
from safetensors.torch import load_file, save_file

from conftest import mpiexec, mpifed
from mpifed import configfile
from mpifed.data.corpus import VOCAB_SIZE
from mpifed.layout import FlatLayout
from mpifed.model import InitialModel, build_model, model_for

ENGINES = {"f0": ("fsdp", 2), "f1": ("replica", 1), "f2": ("deepspeed", 2)}  # ZeRO-3 at f2


def _config(tmp_path, sets):
    facilities = [{"name": name, "ranks": ranks, "engine": engine} for name, (engine, ranks) in ENGINES.items()]
    facilities[2]["deepspeed"] = {"zero_stage": 3}
    cfg = configfile.from_dict(configfile.apply_sets({"facility": facilities}, [
        "train.local_steps=1", "federation.rounds=1", "train.micro_batch=2", "data.seq_len=32",
        "eval.facilities=false", f"checkpoint.dir={tmp_path / 'run'}", *sets]))
    path = tmp_path / "c.toml"
    path.write_text(configfile.dump_toml(cfg))
    return cfg, path


def _held(out, rank):
    saved = np.load(out / f"held-{rank}.npz")
    return [(int(offset), saved[f"v{i}"]) for i, offset in enumerate(saved["offsets"])]


def _check_every_rank_holds(out, expected):
    """Each rank's held pieces equal `expected` there; sharded ranks hold a share, not the whole."""
    for rank in range(sum(ranks for _, ranks in ENGINES.values())):
        held = _held(out, rank)
        for offset, values in held:
            np.testing.assert_array_equal(values, expected[offset:offset + len(values)], err_msg=f"rank {rank}")
        total = sum(len(values) for _, values in held)
        if rank in (0, 1, 3, 4):  # fsdp and ZeRO-3: about half each
            assert total < 0.75 * len(expected), (rank, total)
        else:  # replica: all of it
            assert total == len(expected)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_a_sharded_safetensors_folder_reaches_every_engine_by_range(tmp_path, dtype):
    """In bf16 every engine holds the file's values rounded to bf16 (ZeRO-3's partitions are built in
    the model's dtype, whatever the CPU's fp16 support: DeepSpeed's own default follows it)."""
    model = build_model("llama-tiny", 32, 7, vocab_size=VOCAB_SIZE)
    model.save_pretrained(tmp_path / "model", max_shard_size="200KB")
    assert len(list((tmp_path / "model").glob("model-*.safetensors"))) > 2
    cfg, path = _config(tmp_path, [f"model.path={tmp_path / 'model'}", f"model.dtype={dtype}"])
    mpiexec([2, 1, 2], "start_worker.py", str(path), str(tmp_path), timeout=400)
    # what safetensors itself reads, whole, in the layout's order
    tensors = {}
    for shard in sorted((tmp_path / "model").glob("model-*.safetensors")):
        tensors.update(load_file(shard))
    layout = FlatLayout.of(model_for(cfg, 32, VOCAB_SIZE))
    rounded = (lambda t: t.bfloat16()) if dtype == "bf16" else (lambda t: t)
    expected = np.concatenate([rounded(tensors[slot.name]).float().numpy().ravel() for slot in layout.slots])
    assert (dtype == "bf16") != np.array_equal(expected, np.concatenate(
        [tensors[slot.name].float().numpy().ravel() for slot in layout.slots]))
    assert not np.array_equal(expected, InitialModel(model, layout, configfile.from_dict({}))(0, layout.numel))
    _check_every_rank_holds(tmp_path, expected)


@pytest.mark.slow
def test_a_fresh_start_reaches_every_engine_and_follows_the_initialisation_rule(tmp_path):
    cfg, path = _config(tmp_path, ["train.seed=3"])
    mpiexec([2, 1, 2], "start_worker.py", str(path), str(tmp_path), timeout=400)
    model = model_for(cfg, 32, VOCAB_SIZE)
    layout = FlatLayout.of(model)
    whole = np.concatenate([values for _, values in _held(tmp_path, 2)])  # the replica rank: all of it
    _check_every_rank_holds(tmp_path, whole)
    config = model.config
    for name, values in layout.unflatten(whole).items():
        if "norm" in name:  # RMSNorm weights start at one, as transformers initialises them
            assert (values == 1).all(), name
        else:  # the rest normal(0, initializer_range), each tensor its own draw
            assert abs(values.mean()) < 4 * config.initializer_range / values.size ** 0.5 + 1e-3, name
            assert values.std() == pytest.approx(config.initializer_range, rel=0.1), name
    first = layout.unflatten(whole)
    assert not np.array_equal(first["model.layers.0.mlp.up_proj.weight"][:8, :8],
                              first["model.layers.1.mlp.up_proj.weight"][:8, :8])


def _one_line(result, *words):
    assert result.returncode == 2, (result.returncode, result.stderr[-2000:])
    assert "Traceback" not in result.stderr, result.stderr
    lines = [line for line in result.stderr.splitlines() if "error:" in line and "mpifed simulate" not in line]
    assert len(lines) == 1, result.stderr  # said once (by world rank 0), whatever the number of ranks
    for word in words:
        assert word in lines[0], lines[0]


@pytest.mark.slow
def test_a_model_folder_whose_safetensors_do_not_match_its_config(tmp_path):
    folder = tmp_path / "model"
    build_model("llama-tiny", 128, 7, vocab_size=VOCAB_SIZE).save_pretrained(folder)
    config = json.loads((folder / "config.json").read_text())
    config["intermediate_size"] = 200
    (folder / "config.json").write_text(json.dumps(config))
    common = ["simulate", "--facilities", "1", "--ranks-per-facility", "2", "--rounds", "1", "--local-steps", "1",
              "--set", f"model.path={folder}", "--set", "facility.f0.engine=fsdp"]
    _one_line(mpifed(*common, "--out", str(tmp_path / "a")), f"model.path {folder / 'model.safetensors'}",
              "model.layers.0.mlp.gate_proj.weight", "(172, 64)", "(200, 64)")
    tensors = load_file(folder / "model.safetensors")
    config["intermediate_size"] = 172
    (folder / "config.json").write_text(json.dumps(config))
    save_file({k: v for k, v in tensors.items() if k != "model.norm.weight"}, folder / "model.safetensors",
              metadata={"format": "pt"})
    _one_line(mpifed(*common, "--out", str(tmp_path / "b")), f"model.path {folder}", "no tensor model.norm.weight")


def _start_big(tmp_path, facility: dict, limited: bool = False, *worker_args: str) -> tuple[float, float]:
    """Start (not train) a LLaMA of 0.4B parameters (1.6 GB in fp32) on the 4 ranks of `facility`, each
    the root of a quarter, under start_worker.py with `worker_args`; `limited`: each rank's address space
    limited to the plan's start plus 0.6 of the model. Every rank must hold its quarter exactly. Returns
    the whole model and what `mpifed plan` says a rank needs at start beyond the runtime, in MiB."""
    from mpifed import plan, preflight
    from mpifed.model import planned_model
    from transformers import LlamaConfig

    config = LlamaConfig(hidden_size=1024, intermediate_size=2816, num_hidden_layers=32, num_attention_heads=16,
                         num_key_value_heads=16, vocab_size=VOCAB_SIZE, max_position_embeddings=16)
    config.save_pretrained(tmp_path / "big")
    cfg = configfile.from_dict(configfile.apply_sets({"facility": [dict(name="f0", ranks=4, **facility)]}, [
        f"model.path={tmp_path / 'big'}", "model.reinit=true", "train.micro_batch=1", "data.seq_len=16",
        "data.val_sequences=2", "eval.facilities=false", "federation.roots=4", "federation.rounds=1",
        f"checkpoint.dir={tmp_path / 'run'}"]))
    (tmp_path / "c.toml").write_text(configfile.dump_toml(cfg))
    model, layout = planned_model(cfg, 16, VOCAB_SIZE)
    whole_mb = 4 * layout.numel / 2 ** 20
    assert whole_mb > 1400
    dims = (model.config.hidden_size, model.config.num_hidden_layers, VOCAB_SIZE, 16)
    start_mb = (plan.plan_facility(cfg, 0, layout, dims, 0).rank.start - preflight.RUNTIME_GB * plan.GB) / 2 ** 20
    limit = [f"--limit-mb={int(start_mb + 0.6 * whole_mb)}"] if limited else []
    started = mpiexec(4, "start_worker.py", str(tmp_path / "c.toml"), str(tmp_path), *limit, *worker_args,
                      timeout=400, check=False)
    assert started.returncode == 0, started.stderr[-3000:]
    held = [_held(tmp_path, rank) for rank in range(4)]
    assert sum(len(v) for pieces in held for _, v in pieces) == layout.numel
    assert all(sum(len(v) for _, v in pieces) < 0.3 * layout.numel for pieces in held)
    return whole_mb, start_mb


@pytest.mark.slow
def test_a_sharded_rank_starts_without_room_for_a_whole_model(tmp_path):
    """4 fsdp ranks. Every rank's address space is limited to what `mpifed plan` says a rank needs at
    start beyond the runtime (its shard, its segment of the global model, one bucket) plus less than
    one whole model: each starts and holds exactly its quarter, and then has no room left for one whole
    fp32 copy. (The start this replaced built the whole model on every rank and broadcast a whole copy
    of it.)"""
    whole_mb, start_mb = _start_big(tmp_path, {"engine": "fsdp"}, True, "--probe")
    assert start_mb < 1.5 * whole_mb  # what a sharded rank needs: well under the two whole copies of before
    assert [(tmp_path / f"probe-{rank}.txt").read_text() for rank in range(4)] == ["no room"] * 4


@pytest.mark.slow
def test_a_zero3_rank_starts_on_its_partitions_alone(tmp_path):
    """4 ZeRO-3 ranks: DeepSpeed builds the model under zero.Init, partitioned as it is made, so no rank
    ever fills a whole copy. Measured as resident memory, from the OS: an address space limit does not
    fit DeepSpeed, whose initialize reserves its reduction bucket whole (untouched where the model is
    smaller) and whose threads' malloc arenas move the mapped total by a GB between runs. Each rank's
    resident peak rises by less than `mpifed plan`'s start (which counts what initialize makes: the
    optimizer's state, a defragmented copy of the partitions) plus 0.3 of the model; the whole build
    this replaced filled one whole model more."""
    whole_mb, start_mb = _start_big(tmp_path, {"engine": "deepspeed", "deepspeed": {"zero_stage": 3}})
    risen = [int((tmp_path / f"resident-{rank}.txt").read_text()) / 2 ** 20 for rank in range(4)]
    assert max(risen) < start_mb + 0.3 * whole_mb, (risen, start_mb, whole_mb)
    assert min(risen) > 0.5 * start_mb  # it did measure the start: the partitions and their state


def test_plan_counts_what_an_independent_count_gives_and_warns_where_it_cannot_fit(tmp_path):
    cfg = tmp_path / "plan.toml"
    cfg.write_text('[model]\npreset = "llama3-8b"\n\n'
                   '[[facility]]\nname = "whole"\nsite = "leonardo"\nranks = 4\nengine = "replica"\n\n'
                   '[[facility]]\nname = "sharded"\nsite = "leonardo"\nranks = 32\nengine = "fsdp"\n')
    result = mpifed("plan", str(cfg), "--bandwidth", "10gbit")
    assert result.returncode == 0, result.stderr
    # LLaMA-3-8B's shapes over the embedded corpus's 256 tokens, counted by hand
    h, inner, layers, kv, vocab = 4096, 14336, 32, 8 * 128, VOCAB_SIZE
    params = 2 * vocab * h + h + layers * (2 * h * h + 2 * h * kv + 3 * h * inner + 2 * h)
    lines = result.stdout.splitlines()
    assert lines[0] == f"facility whole: 4 ranks x replica on site leonardo, {params / 1e6:,.1f}M parameters"
    whole = next(i for i, line in enumerate(lines) if line.startswith("facility whole"))
    sharded = next(i for i, line in enumerate(lines) if line.startswith("facility sharded"))
    assert f"weights {4 * params / 1e9:7.2f} GB" in lines[whole + 1]
    assert f"weights {4 * params / 32 / 1e9:7.2f} GB" in lines[sharded + 1]
    assert any("warning: a rank's engine state needs" in line and "the 64.0 GB of a GPU" in line
               for line in lines[whole:sharded])
    assert not any("warning: a rank" in line for line in lines[sharded:])
    # two facilities: each root sends half its payload in each phase, fp32: the whole model in all
    moved = next(line for line in lines[sharded:] if "a round moves" in line)
    assert f"{4 * params / 1e6:,.1f} MB to other sites" in moved
    assert f"({4 * params * 8 / 10e9:,.1f} s at 10gbit)" in moved


def test_plan_gives_the_disk_a_round_takes_at_each_site_as_the_files_are(tmp_path):
    """Issue 33: `mpifed plan` said nothing about disk. A run with DiLoCo (momentum), int8 (two residuals),
    two roots (segments) and two fragments (the local model kept): the plan's bytes per round at the hub's
    site and at the other's, against the files a run writes; and its advice where they do not fit."""
    from mpifed import plan as planner

    cfg = tmp_path / "c.toml"
    cfg.write_text(f'[federation]\nrounds = 2\nouter = "diloco"\ncompress = "int8"\nroots = 2\nfragments = 2\n'
                   f'[train]\nlocal_steps = 2\n[checkpoint]\ndir = "{tmp_path / "run"}"\nkeep = 1\n')
    said = mpifed("plan", str(cfg))
    assert said.returncode == 0, said.stderr
    told = [line for line in said.stdout.splitlines() if line.startswith("  checkpoints")]
    assert mpifed("simulate", "--config", str(cfg), "--out", str(tmp_path / "run")).returncode == 0
    size = lambda pattern: sum(p.stat().st_size for p in (tmp_path / "run").glob(pattern))  # noqa: E731
    hub, other = size("round_00002.h5") + size("round_00002.seg-*.h5") + size("round_00002.fac-f0.h5"), \
        size("round_00002.fac-f1.h5")
    for line, actual, kept in [(told[0], hub, 1), (told[1], other, 2)]:
        predicted, whole = re.match(r"  checkpoints +([\d.]+) MB a round at its site .*, ([\d.]+) MB for the rounds",
                                    line).groups()
        assert abs(float(predicted) * 1e6 - actual) < 0.03 * actual + 0.1e6, (line, actual)
        assert float(whole) == pytest.approx(kept * float(predicted), abs=0.11)
    config = configfile.from_dict(configfile.load(cfg))
    plans = [planner.FacilityPlan(f, 0, None, 0, 0, 0, 0, 0, 10e9, 10e9 * k) for f, k in zip(config.facility, (4, 3))]
    where = f"and checkpoint.dir {tmp_path / 'run'} has"
    assert planner.disk_problems(config, plans, 25e9) == [  # the hub keeps checkpoint.keep, a parts site one more
        f"facility f0: its site keeps 40.0 GB of checkpoints (10.0 GB a round), {where} 25.0 GB free here: set "
        "checkpoint.keep = 2 or less",
        f"facility f1: its site keeps 30.0 GB of checkpoints (10.0 GB a round), {where} 25.0 GB free here: set "
        "checkpoint.keep = 1 or less"]
    hub, parts = planner.disk_problems(config, plans, 15e9)  # one round fits: the hub may keep it, a parts site not
    room = "make room, or give it a checkpoint.dir on a larger filesystem (the rounds it must keep do not fit)"
    assert hub.endswith("set checkpoint.keep = 1 or less") and parts.endswith(room)
    assert all(line.endswith(room) for line in planner.disk_problems(config, plans, 5e9))
    assert planner.disk_problems(config, plans, 40e9) == []


def _fits(cfg, index: int, layout, dims) -> bool:
    from mpifed import plan as planner

    return not planner.plan_facility(cfg, index, layout, dims, 0.0).problems()


def test_plan_names_the_setting_that_fixes_each_kind_of_shortfall(tmp_path, monkeypatch):
    """Issue 33: the 8B project's ranks needed 135 GB of host memory and the advice said to shard (it was
    sharded already) when `federation.roots = 4` was what fitted. For each kind of shortfall the plan
    now names the settings that fit, each re-planned: more roots for mpifed's host buffers (the fewest
    that fit), activation checkpointing or a smaller micro-batch (same tokens) for activations on the
    GPU, a sharding engine for a replica, a combination where nothing fits alone, and says so where no
    change does. Each named fix, applied, fits; one root fewer does not."""
    from mpifed import plan as planner
    from mpifed.model import planned_model

    (tmp_path / "small.toml").write_text(
        'name = "small"\ndescription = "a 16 GB CPU node"\naccelerator = "cpu"\ntorch_backend = "gloo"\n'
        '[scheduler]\ncpus_per_node = 2\nranks_per_node = 2\nmemory_gb = 16\n')
    monkeypatch.setenv("MPIFED_SITECFG", str(tmp_path))
    base = {"model": {"preset": "llama3-8b", "dtype": "bf16"}, "data": {"seq_len": 2048}, "train": {"micro_batch": 8}}
    cfg = configfile.from_dict({**base, "facility": [
        {"name": "host", "site": "lumi", "ranks": 8, "engine": "fsdp", "fsdp": {"activation_checkpointing": True}},
        {"name": "acts", "site": "leonardo", "ranks": 8, "engine": "fsdp"},
        {"name": "rep", "site": "leonardo", "ranks": 8, "engine": "replica"}]})
    tiny = configfile.from_dict({**base, "facility": [{"name": "tiny", "site": "small", "ranks": 1, "engine": "fsdp"}]})
    model, layout = planned_model(cfg, 2048, VOCAB_SIZE)
    dims = (model.config.hidden_size, model.config.num_hidden_layers, model.config.vocab_size, 2048)
    plans = [planner.plan_facility(cfg, i, layout, dims, 0.0) for i in range(3)]
    assert all(plan.problems() for plan in plans)
    advice = {i: planner.fixes(cfg, i, layout, dims) for i in range(3)}

    def applied(fix: str):
        sets = fix.split(" (")[0].removeprefix("all of ").replace(" and ", ", ").split(", ")
        return configfile.with_sets(cfg, sets)

    roots = [fix for fix in advice[0] if fix.startswith("federation.roots=")]
    assert len(roots) == 1 and "host memory" in plans[0].problems()[0], (advice[0], plans[0].problems())
    r = int(roots[0].split("=")[1].split(" ")[0])
    assert r > 1 and _fits(applied(roots[0]), 0, layout, dims)
    assert not _fits(configfile.with_sets(cfg, [f"federation.roots={r - 1}"]), 0, layout, dims)
    assert any(f.startswith("facility.acts.fsdp.activation_checkpointing=true ") for f in advice[1]), advice[1]
    assert any(re.match(r"train\.micro_batch=\d and train\.grad_accum=\d+ ", f) for f in advice[1]), advice[1]
    # nothing fits the replica alone: kind after kind, each asked of the configuration as changed so far
    # (fsdp brings activation checkpointing; the roots in between are not skipped)
    assert re.match(r"all of facility\.rep\.engine=fsdp, federation\.roots=\d, "
                    r"facility\.rep\.fsdp\.activation_checkpointing=true \(", advice[2][0]), advice[2]
    for index in range(3):
        for fix in advice[index]:
            assert _fits(applied(fix), index, layout, dims), fix
    assert f"  fits with any one of  {advice[0][0]}" in planner.render(plans, "10gbit", advice)
    assert planner.fixes(tiny, 0, layout, dims) == []  # 8B on a 16 GB node: no change fits
    said = planner.render([planner.plan_facility(tiny, 0, layout, dims, 0.0)], "10gbit", {0: []})
    assert "  no change of engine, roots, activation checkpointing, micro-batch or ranks makes it fit" in said


@pytest.mark.parametrize("args, words", [
    (["--set", "facility.0.ranks=0"], ["facility", "ranks"]),
    (["--bandwidth", "fast"], ["--bandwidth", "'fast'"]),
])
def test_plan_refuses_bad_input_in_one_line(tmp_path, args, words):
    cfg = tmp_path / "plan.toml"
    cfg.write_text('[[facility]]\nname = "a"\nranks = 2\n')
    result = mpifed("plan", str(cfg), *args)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    for word in words:
        assert word in result.stderr
    assert mpifed("plan", str(tmp_path / "missing.toml")).returncode == 2
