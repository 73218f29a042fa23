"""Exports of a verified checkpoint, in one place: the whole model as a Hugging Face folder
(config.json + model.safetensors for `AutoModelForCausalLM.from_pretrained`), a LoRA run's adapters
(peft's format) or its merged model, and the prepared data's tokenizer beside either.

    mpifed ckpt export run/ hf-model [--merge-lora]
"""
from __future__ import annotations

import json
import os
import shutil
import tomllib
from pathlib import Path

import numpy as np

from mpifed.checkpoint.format import VerifiedCheckpoint, read_flat


class ExportError(ValueError):
    """An export that cannot be made from this checkpoint here; the message says what to do."""


def export(verified: VerifiedCheckpoint, out: Path, merge_lora: bool = False) -> str:
    """Write `verified`'s model to the folder `out` (created) and copy the tokenizer beside it; returns
    what was written, for the user. A LoRA checkpoint exports its adapters, or with `merge_lora` the
    merged model; `merge_lora` on a checkpoint without adapters is an ExportError."""
    if merge_lora and not verified.base_digest:
        raise ExportError(f"--merge-lora: {verified.path} is not from a LoRA run (lora.rank = 0); export it without "
                          "the flag")
    out.mkdir(parents=True, exist_ok=True)
    before = {p: p.stat().st_mtime_ns for p in out.iterdir()}
    if verified.base_digest:
        what = _export_lora(verified, out, merge_lora)
    else:
        _export_model(verified, out)
        what = (f"round {verified.round} ({verified.layout.numel:,} parameters); load it with "
                f"AutoModelForCausalLM.from_pretrained({str(out)!r})")
    copy_tokenizer(verified, out)
    # safetensors writes its files 0600 whatever the umask: a model exported for others to load gets
    # the mode every other file the user makes gets
    mode = 0o666 & ~_umask()
    for path in out.iterdir():
        if path.is_file() and before.get(path) != path.stat().st_mtime_ns:
            path.chmod(mode)
    return what


def _umask() -> int:
    """This process's umask, read without changing it (Linux), else set and restored at once."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _export_model(verified: VerifiedCheckpoint, out: Path) -> None:
    """config.json + model.safetensors of the checkpointed model."""
    from safetensors.numpy import save_file

    flat = read_flat(verified.path, verified.layout, "model")
    tensors = {name: np.ascontiguousarray(v) for name, v in verified.layout.unflatten(flat).items()}
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads(verified.model_config)
    config.setdefault("architectures", ["LlamaForCausalLM"])
    config["torch_dtype"] = "float32"
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")


def _export_lora(verified: VerifiedCheckpoint, out: Path, merge: bool) -> str:
    """Rebuild the base a LoRA checkpoint was trained on (checked against its digest), load the
    checkpointed adapters, and save either the adapters (a peft folder) or, with `merge`, the merged
    full model (config.json + model.safetensors for from_pretrained). Returns what was written."""
    import torch

    from mpifed.config import LoraConfig, ModelConfig
    from mpifed.model import ModelError, apply_lora, base_digest, build_model

    run = tomllib.loads(verified.config)
    model_cfg, lora = ModelConfig(**run.get("model", {})), LoraConfig(**run.get("lora", {}))
    seed = run.get("train", {}).get("seed", 0)
    hf = json.loads(verified.model_config)
    try:
        model = apply_lora(build_model(model_cfg, hf.get("max_position_embeddings", 2048), seed,
                                       vocab_size=hf["vocab_size"]), lora, seed)
    except ModelError as exc:
        raise ExportError(str(exc)) from None
    if base_digest(model) != verified.base_digest:
        raise ExportError(f"{verified.path}: the base model rebuilt from "
                          f"model.path={model_cfg.path or model_cfg.preset!r} is not the one its adapters were "
                          "trained on; export where that base is")
    values = verified.layout.unflatten(read_flat(verified.path, verified.layout, "model"))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name in values:
                param.copy_(torch.from_numpy(values[name]))
    if merge:
        model.merge_and_unload().save_pretrained(str(out), safe_serialization=True)
        return f"the merged model of round {verified.round}"
    model.save_pretrained(str(out))
    return f"the LoRA adapters of round {verified.round} (load them with peft's PeftModel.from_pretrained)"


def copy_tokenizer(verified: VerifiedCheckpoint, out: Path) -> None:
    """The data's tokenizer goes beside an exported model, so the folder is complete: the prepared
    data's, or for the embedded text (UTF-8 bytes, id = byte) a byte-level one made here."""
    data_path = tomllib.loads(verified.config).get("data", {}).get("path", "")
    tokenizer = Path(data_path) / "tokenizer"
    if data_path and tokenizer.is_dir():
        for file in tokenizer.iterdir():
            shutil.copy2(file, out / file.name)
    elif not data_path:
        byte_tokenizer().save_pretrained(str(out))


def _byte_symbols() -> list[str]:
    """One printable character for each byte value, the byte-level convention of GPT-2's tokenizers
    (which `tokenizers`' ByteLevel pre-tokenizer and decoder use): printable Latin-1 bytes stand for
    themselves, the others for the code points from 256 on, in byte order."""
    kept = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    shifted = iter(range(256, 512))
    return [chr(b) if b in kept else chr(next(shifted)) for b in range(256)]


def byte_tokenizer():
    """A transformers tokenizer for the embedded text: each UTF-8 byte is one token whose id is its
    value (mpifed/data/corpus.py's VOCAB_SIZE of 256), no special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {symbol: b for b, symbol in enumerate(_byte_symbols())}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok)
