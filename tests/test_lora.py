"""Supervised fine-tuning with LoRA across two facilities (fsdp and DeepSpeed ZeRO-2) under real mpiexec:
the base stays bit-identical, only the adapters cross facilities, and the merged export loads in
transformers and gives the LoRA model's logits."""
import importlib
import inspect
import json

import h5py
import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import mpiexec, mpifed
from mpifed import configfile
from mpifed.checkpoint import format as checkpoint
from mpifed.data.prepare import PrepareOptions, prepare
from mpifed.model import build_model

pytest.importorskip("peft")
RANK, ALPHA = 4, 8.0


def _instructions(path):
    """Questions about standard-library functions, answered with the first paragraph of their docstrings."""
    rows = []
    for name in ("json", "os", "shutil", "pathlib", "collections", "itertools", "functools", "re", "textwrap"):
        module = importlib.import_module(name)
        for attr, obj in sorted(vars(module).items()):
            doc = inspect.getdoc(obj) if callable(obj) and not attr.startswith("_") else None
            if doc and getattr(obj, "__module__", None) == name:
                rows.append({"prompt": f"### Human: What does {name}.{attr} do? ### Assistant:",
                             "response": " " + doc.split("\n\n")[0]})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


@pytest.fixture(scope="module")
def lora_run(bpe_data, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("lora")
    tokenizer = AutoTokenizer.from_pretrained(str(bpe_data[0] / "tokenizer"), local_files_only=True)
    base = build_model("llama-tiny", 128, seed=7, vocab_size=len(tokenizer))
    base.save_pretrained(str(tmp / "base"))
    tokenizer.save_pretrained(str(tmp / "base"))
    _instructions(tmp / "sft.jsonl")
    prepare(PrepareOptions(inputs=(tmp / "sft.jsonl",), out=tmp / "sft", seq_len=96, partitions=2, sft=True,
                           tokenizer=tmp / "base", val_fraction=0.1), say=lambda _: None)
    cfg = configfile.from_dict(configfile.apply_sets({}, [
        f"model.path={tmp / 'base'}", f"data.path={tmp / 'sft'}", f"lora.rank={RANK}", f"lora.alpha={ALPHA}",
        "lora.dropout=0.0", "train.local_steps=4", "train.micro_batch=4", "train.lr=1e-2", "federation.rounds=3",
        "federation.compress=bf16", f"checkpoint.dir={tmp / 'run'}", "facility.f0.ranks=2", "facility.f0.engine=fsdp",
        "facility.f1.ranks=1", "facility.f1.engine=deepspeed", "facility.f1.deepspeed.zero_stage=2"]))
    (tmp / "c.toml").write_text(configfile.dump_toml(cfg))
    mpiexec(3, "train_worker.py", str(tmp / "c.toml"), str(tmp), timeout=400)
    return tmp


def _adapter_numel(config) -> int:
    """LoRA on q_proj and v_proj: A is r x in, B is out x r, per layer."""
    head = config.hidden_size // config.num_attention_heads
    q, v = config.num_attention_heads * head, config.num_key_value_heads * head
    return config.num_hidden_layers * (RANK * config.hidden_size + q * RANK + RANK * config.hidden_size + v * RANK)


def test_lora_trains_in_two_facilities_and_only_adapters_cross(lora_run):
    digests = {(lora_run / f"digest-{rank}.txt").read_text() for rank in range(3)}
    assert len(digests) == 1  # one global model on every rank of both engines
    rows = [json.loads(line) for line in (lora_run / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [1, 2, 3]
    assert rows[-1]["val_loss"] < rows[0]["val_loss"]
    base = AutoModelForCausalLM.from_pretrained(str(lora_run / "base"))
    adapters = _adapter_numel(base.config)
    for r in rows:  # 2 facilities x adapter values x 2 bytes (bf16)
        assert r["bytes_inter"] == 2 * adapters * 2
    assert adapters * 50 < sum(p.numel() for p in base.parameters())


def test_base_weights_stay_bit_identical(lora_run):
    from safetensors.torch import load_file

    original = dict(AutoModelForCausalLM.from_pretrained(str(lora_run / "base")).named_parameters())
    for leader in (0, 2):  # the fsdp facility's leader (shards gathered) and the deepspeed one
        held = {name.removeprefix("base_model.model.").replace(".base_layer", ""): value
                for name, value in load_file(str(lora_run / f"base-{leader}.safetensors")).items()}
        assert held.keys() == original.keys()
        for name, value in original.items():
            assert torch.equal(held[name], value.detach()), name


def test_merged_export_loads_and_matches_the_lora_model(lora_run, tmp_path):
    from peft import LoraConfig, get_peft_model

    result = mpifed("ckpt", "export", str(lora_run / "run"), str(tmp_path / "merged"), "--merge-lora")
    assert result.returncode == 0, result.stderr
    merged = AutoModelForCausalLM.from_pretrained(str(tmp_path / "merged"))
    assert AutoTokenizer.from_pretrained(str(tmp_path / "merged"), local_files_only=True) is not None
    # the LoRA model built independently: the base folder, peft, and the adapters read with h5py
    lora = get_peft_model(AutoModelForCausalLM.from_pretrained(str(lora_run / "base")),
                          LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=0.0, target_modules=["q_proj", "v_proj"]))
    with h5py.File(lora_run / "run" / checkpoint.main_name(3)) as h5, torch.no_grad():
        trained = [n for n, p in lora.named_parameters() if p.requires_grad]
        assert sorted(trained) == sorted(h5["model"])
        for name, param in lora.named_parameters():
            if param.requires_grad:
                param.copy_(torch.from_numpy(h5["model"][name][()]))
        assert any(np.abs(h5["model"][n][()]).max() > 0 for n in trained if "lora_B" in n)  # B starts at 0
    ids = torch.from_numpy(np.random.default_rng(0).integers(0, merged.config.vocab_size, (2, 40)))
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, lora(ids).logits, atol=1e-5, rtol=1e-5)
    # inspect says adapters and base apart (issue 32 item 9: it gave the adapters' count as the model's)
    info = mpifed("ckpt", "inspect", str(lora_run / "run"))
    adapters = sum(p.numel() for p in lora.parameters() if p.requires_grad)
    assert info.returncode == 0 and f"with LoRA adapters: {adapters:,} adapter parameters in {len(trained)} tensors " \
        f"(rank {RANK}, alpha {float(ALPHA)}, on q_proj,v_proj); the frozen base, {lora_run / 'base'}" in info.stdout
    plain = mpifed("ckpt", "export", str(lora_run / "run"), str(tmp_path / "adapters"))
    assert plain.returncode == 0 and (tmp_path / "adapters" / "adapter_model.safetensors").is_file()


def test_an_sft_lora_run_resumes_mid_epoch_bit_for_bit(lora_run, tmp_path):
    """Stopped after round 2 (mid-epoch in the memory-mapped partitions) and resumed to round 4: the same
    adapters, outer state and losses as one run of 4 rounds."""
    common = ["simulate", "--facilities", "2", "--ranks-per-facility", "1", "--local-steps", "4",
              "--set", f"model.path={lora_run / 'base'}", "--set", f"data.path={lora_run / 'sft'}",
              "--set", f"lora.rank={RANK}", "--set", "train.micro_batch=4", "--set", "federation.outer=diloco"]
    assert mpifed(*common, "--rounds", "4", "--out", "a", cwd=tmp_path).returncode == 0
    assert mpifed(*common, "--rounds", "2", "--out", "b", cwd=tmp_path).returncode == 0
    resumed = mpifed(*common, "--rounds", "4", "--out", "b", "--resume", "auto", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    with h5py.File(tmp_path / "a" / checkpoint.main_name(4)) as a, h5py.File(tmp_path / "b" / checkpoint.main_name(4)) as b:
        for group in ("model", "outer/momentum"):
            for name in a[group]:
                assert a[group][name][()].tobytes() == b[group][name][()].tobytes(), name
    rows = lambda run: [(r["round"], r["train_loss"]) for r in  # noqa: E731
                        map(json.loads, (tmp_path / run / "metrics.jsonl").read_text().splitlines())]
    assert rows("a") == rows("b")
