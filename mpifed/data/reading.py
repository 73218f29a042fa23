"""Reading `mpifed data prepare`'s inputs into documents: text files and folders of them (the top folder
is a document's source), JSON lines, and `datasets` folders saved with `save_to_disk`; with --sft,
instruction examples ('### Human: ... ### Assistant: ...' text, or prompt and response fields).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from mpifed.data.options import PrepareError

if TYPE_CHECKING:
    from mpifed.data.options import PrepareOptions

TEXT_SUFFIXES = {".txt", ".md", ".rst", ".text"}
JSON_SUFFIXES = {".jsonl", ".json"}
HUMAN, ASSISTANT = "### Human:", "### Assistant:"


@dataclass
class Records:
    """The documents read from the inputs: the text (or prompt and response) of each and its source."""

    columns: dict[str, list[str]]
    sources: list[str]

    def __len__(self) -> int:
        return len(self.sources)


def _split_marked(text: str, where: str) -> tuple[str, str]:
    """'### Human: … ### Assistant: …' → (prompt through the last Assistant marker, response)."""
    cut = text.rfind(ASSISTANT)
    if cut < 0 or HUMAN not in text[:cut]:
        raise PrepareError(f"{where}: an SFT example needs '{HUMAN} … {ASSISTANT} …' "
                           "(or JSON lines with --prompt-field/--response-field)")
    cut += len(ASSISTANT)
    return text[:cut], text[cut:]


def _marked_examples(text: str) -> list[str]:
    """A text file of SFT examples: each starts at a '### Human:' line that follows an answer."""
    out, current = [], []
    for line in text.splitlines(keepends=True):
        if line.startswith(HUMAN) and any(ASSISTANT in seen for seen in current):
            out.append("".join(current).strip())
            current = []
        current.append(line)
    if "".join(current).strip():
        out.append("".join(current).strip())
    return out


class _Reader:
    """Collects documents (or SFT examples) from every kind of input into one `Records`."""

    def __init__(self, opts: "PrepareOptions") -> None:
        self.opts = opts
        keys = ("prompt", "response") if opts.sft else ("text",)
        self.records = Records({key: [] for key in keys}, [])
        self.skipped: list[str] = []  # with --skip-bad: each input left out, and why

    def _bad(self, exc: PrepareError) -> None:
        """An input that cannot be read: the end (one line), or with --skip-bad one more skipped."""
        if not self.opts.skip_bad:
            raise exc
        self.skipped.append(str(exc))

    def add_text(self, text: str, source: str, where: str) -> None:
        if not text.strip():
            return
        if not self.opts.sft:
            self._add({"text": text}, source)
            return
        for i, example in enumerate(_marked_examples(text)):
            prompt, response = _split_marked(example, f"{where} (example {i + 1})")
            self._add({"prompt": prompt, "response": response}, source)

    def add_record(self, record: dict, source: str, where: str) -> None:
        opts = self.opts
        if opts.source_field:
            if opts.source_field not in record:
                raise PrepareError(f"{where}: no field {opts.source_field!r} for --source-field "
                                   f"(fields: {', '.join(record)})")
            source = str(record[opts.source_field])
        if opts.sft and opts.prompt_field in record and opts.response_field in record:
            self._add({"prompt": str(record[opts.prompt_field]), "response": str(record[opts.response_field])}, source)
        elif opts.text_field in record:
            self.add_text(str(record[opts.text_field]), source, where)
        else:
            wanted = (f"{opts.prompt_field!r} and {opts.response_field!r} (or {opts.text_field!r})" if opts.sft
                      else f"{opts.text_field!r} (--text-field)")
            raise PrepareError(f"{where}: no field {wanted} (fields: {', '.join(record) or 'none'})")

    def _add(self, values: dict[str, str], source: str) -> None:
        for key, value in values.items():
            self.records.columns[key].append(value)
        self.records.sources.append(source)

    def read(self, path: Path) -> None:
        if path.is_dir() and any((path / name).exists() for name in ("dataset_info.json", "dataset_dict.json")):
            self._read_dataset(path)
        elif path.is_dir():
            files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in TEXT_SUFFIXES | JSON_SUFFIXES)
            if not files:
                raise PrepareError(f"{path}: no input in this folder (looked for "
                                   f"{', '.join(sorted(TEXT_SUFFIXES | JSON_SUFFIXES))} files and saved datasets)")
            for file in files:
                top = file.relative_to(path).parts
                self._read_file(file, top[0] if len(top) > 1 else file.name)
        else:
            self._read_file(path, path.name)

    def _read_file(self, path: Path, source: str) -> None:
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            self._bad(PrepareError(f"{path}: cannot read it as UTF-8 text ({exc})"))
            return
        if path.suffix.lower() not in JSON_SUFFIXES:
            try:
                self.add_text(text, source, str(path))
            except PrepareError as exc:
                self._bad(exc)
            return
        for number, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                try:
                    record = json.loads(line)
                except ValueError as exc:
                    raise PrepareError(f"{path} line {number}: not a JSON object ({exc})") from None
                if not isinstance(record, dict):
                    raise PrepareError(f"{path} line {number}: not a JSON object")
                self.add_record(record, source, f"{path} line {number}")
            except PrepareError as exc:
                self._bad(exc)

    def _read_dataset(self, path: Path) -> None:
        import datasets

        loaded = datasets.load_from_disk(str(path))
        if isinstance(loaded, datasets.DatasetDict):
            if "train" not in loaded and len(loaded) != 1:
                raise PrepareError(f"{path}: a DatasetDict without a 'train' split (splits: {', '.join(loaded)}); "
                                   "save the split to prepare on its own")
            loaded = loaded["train"] if "train" in loaded else next(iter(loaded.values()))
        for i, record in enumerate(loaded):
            try:
                self.add_record(record, path.name, f"{path} row {i}")
            except PrepareError as exc:
                self._bad(exc)


def read_inputs(opts: "PrepareOptions") -> tuple[Records, list[str]]:
    """Every input's documents (or examples), and with --skip-bad what was left out and why."""
    reader = _Reader(opts)
    for path in opts.inputs:
        reader.read(path)
    if not reader.records:
        raise PrepareError(f"{', '.join(map(str, opts.inputs))}: no text found in the inputs"
                           + (f" ({len(reader.skipped)} skipped as bad)" if reader.skipped else ""))
    return reader.records, reader.skipped
