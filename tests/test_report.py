"""`mpifed report`: from real run folders it writes a self-contained HTML page (one embedded PNG per
plot, a table whose numbers are the metrics files') and a PNG grid; bad input is one line, exit 2,
nothing written; runs without a round in common are plotted with a note; labels name key settings."""
import base64
import io
import json
import math
import shutil
import sys
from html.parser import HTMLParser
from pathlib import Path

import pytest

from conftest import mpifed, run

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
PLOT_COUNT = 7


def report(*args: str):
    """`mpifed report ARGS`, the real command line."""
    return mpifed("report", *args)


def _one_line_error(result, *words: str) -> str:
    assert result.returncode == 2, result
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr and result.stdout == ""
    assert lines[0].startswith("mpifed report: error: "), lines[0]
    for word in words:
        assert word in lines[0], lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> list[Path]:
    """Two short real runs with different settings (2 facilities x 1 rank, 2 rounds of 2 small steps)."""
    base = tmp_path_factory.mktemp("runs")
    made = []
    for name, extra in [("fedavg-run", []),
                        ("diloco-run", ["--set", "federation.outer=diloco", "--set", "federation.compress=int8"])]:
        out = base / name
        result = mpifed("simulate", "--rounds", "2", "--local-steps", "2", "--facilities", "2",
                        "--ranks-per-facility", "1", "--set", "train.micro_batch=4", "--set", "data.seq_len=64",
                        *extra, "--out", str(out), cwd=base)
        assert result.returncode == 0, result.stderr
        made.append(out)
    return made


class _Page(HTMLParser):
    """The table rows (cells as text) and the img sources of a page; notes any reference to elsewhere."""

    def __init__(self) -> None:
        super().__init__()
        self.rows: list[list[str]] = []
        self.images: list[str] = []
        self.external: list[str] = []
        self._cell: list[str] | None = None

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "tr":
            self.rows.append([])
        elif tag in ("td", "th"):
            self._cell = []
        elif tag == "img":
            self.images.append(attrs["src"])
        if tag in ("script", "link") or any(str(v).startswith(("http:", "https:", "//")) for v in attrs.values()):
            self.external.append(tag)

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self._cell is not None:
            self.rows[-1].append("".join(self._cell).strip())
            self._cell = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell.append(data)


def _png_array(data: bytes):
    import matplotlib.image

    assert data.startswith(PNG_SIGNATURE)
    return matplotlib.image.imread(io.BytesIO(data), format="png")


def test_html_and_png_from_two_real_runs(runs, tmp_path):
    page, grid = tmp_path / "report.html", tmp_path / "report.png"
    result = report(*map(str, runs), "--out", str(page), "--png", str(grid))
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""  # the runs share their rounds: no note
    assert str(page) in result.stdout and str(grid) in result.stdout

    data = grid.read_bytes()
    assert len(data) < 200_000
    image = _png_array(data)
    assert image.ndim == 3 and image.shape[0] >= 500 and image.shape[1] >= 1000, image.shape
    assert image.std() > 0.05  # drawn, not blank

    text = page.read_text(encoding="utf-8")
    parsed = _Page()
    parsed.feed(text)
    assert parsed.external == []
    assert len(parsed.images) == PLOT_COUNT and text.count("<img") == PLOT_COUNT
    for src in parsed.images:
        assert src.startswith("data:image/png;base64,")
        plot = _png_array(base64.b64decode(src.split(",", 1)[1], validate=True))
        assert plot.shape[0] > 200 and plot.shape[1] > 300

    header, *rows = parsed.rows
    assert len(rows) == 2
    column = {name: i for i, name in enumerate(header)}
    labels = {"fedavg-run": "2 fac x 1 rank, replica, H=2, fedavg, fp32",
              "diloco-run": "2 fac x 1 rank, replica, H=2, diloco, int8"}
    for folder, row in zip(runs, rows):
        assert row[column["folder"]] == str(folder)
        assert row[column["label"]] == labels[folder.name]
        lines = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines() if line.strip()]
        final = lines[-1]["val_loss"]
        assert row[column["rounds"]].startswith(f"{len(lines)} ")
        assert row[column["final val loss"]] == f"{final:.4f}"
        assert row[column["perplexity"]] == f"{math.exp(final):,.2f}"
        assert row[column["tokens"]] == f"{lines[-1]['tokens_total']:,}"
        assert row[column["MB between sites"]] == f"{sum(l['bytes_inter'] for l in lines) / 1e6:,.2f}"
        assert row[column["wall time (s)"]] == f"{sum(l['wall_s'] for l in lines):,.1f}"


def test_reading_and_rendering_load_neither_torch_nor_mpi(runs, tmp_path):
    probe = ("import sys\n"
             "import mpifed.cli.report\n"
             "assert 'matplotlib' not in sys.modules, 'imported at import time'\n"
             "from mpifed import report\n"
             f"loaded = report.load_runs([__import__('pathlib').Path(p) for p in {list(map(str, runs))!r}])\n"
             "page, grid = report.build(loaded, html_page=False, png_grid=True)\n"
             "assert 'matplotlib' in sys.modules and grid.startswith(b'\\x89PNG')\n"
             "print(sorted(m for m in ('torch', 'mpi4py', 'mpifed.run', 'mpifed.engines') if m in sys.modules))\n")
    result = run([sys.executable, "-c", probe], timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_a_folder_without_metrics_is_one_error_and_nothing_is_written(runs, tmp_path):
    bare = tmp_path / "not-trained"
    bare.mkdir()
    shutil.copy(runs[0] / "mpifed.toml", bare / "mpifed.toml")
    page, grid = tmp_path / "r.html", tmp_path / "r.png"
    _one_line_error(report(str(runs[0]), str(bare), "--out", str(page), "--png", str(grid)),
                    str(bare), "metrics.jsonl", "run a training there first")
    _one_line_error(report(str(runs[0]), str(tmp_path / "missing"), "--out", str(page)),
                    str(tmp_path / "missing"), "no such run folder")
    assert not page.exists() and not grid.exists()


def test_bad_metrics_lines_name_file_and_line(runs, tmp_path):
    folder = tmp_path / "broken"
    folder.mkdir()
    good = (runs[0] / "metrics.jsonl").read_text().splitlines()[0]
    (folder / "metrics.jsonl").write_text(good + "\n{\"round\": 2, \"train_loss\": \n")
    out = tmp_path / "r.html"
    _one_line_error(report(str(folder), "--out", str(out)), str(folder / "metrics.jsonl"), "line 2")
    (folder / "metrics.jsonl").write_text("\n")
    _one_line_error(report(str(folder), "--out", str(out)), str(folder / "metrics.jsonl"), "no rounds")
    (folder / "metrics.jsonl").write_text(good + "\n" + good + "\n")
    _one_line_error(report(str(folder), "--out", str(out)), "line 2", "round 1 is logged again")
    assert not out.exists()


def test_outputs_that_cannot_be_written(runs, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    _one_line_error(report(str(runs[0]), "--out", str(blocker / "r.html")), "--out", "not a folder")
    _one_line_error(report(str(runs[0]), "--png", str(tmp_path / "no-such-dir" / "r.png")), "--png", "does not exist")
    _one_line_error(report(str(runs[0])), "--out", "--png")
    assert blocker.read_text() == "x" and list(tmp_path.iterdir()) == [blocker]


def test_runs_without_rounds_in_common_are_plotted_with_a_note(runs, tmp_path):
    lines = [json.loads(line) for line in (runs[0] / "metrics.jsonl").read_text().splitlines()]
    folders = []
    for name, numbers in (("early", (1, 2)), ("late", (7, 8))):
        folder = tmp_path / name
        folder.mkdir()
        shutil.copy(runs[0] / "mpifed.toml", folder / "mpifed.toml")
        (folder / "metrics.jsonl").write_text("".join(json.dumps({**line, "round": n}) + "\n"
                                                      for line, n in zip(lines, numbers)))
        folders.append(folder)
    page = tmp_path / "r.html"
    result = report(*map(str, folders), "--out", str(page))
    assert result.returncode == 0, result.stderr
    note = result.stderr.strip().splitlines()
    assert note == [f"mpifed report: note: runs {folders[0]} and {folders[1]} have no rounds in common; "
                    "plotting what each has"]
    text = page.read_text(encoding="utf-8")
    assert text.count("data:image/png;base64,") == PLOT_COUNT
    # the same settings: each label gets its folder's name
    assert "2 fac x 1 rank, replica, H=2, fedavg, fp32 (early)" in text
    assert "2 fac x 1 rank, replica, H=2, fedavg, fp32 (late)" in text


def test_without_matplotlib_the_command_says_what_to_install(runs, tmp_path):
    program = "import sys; sys.modules['matplotlib'] = None; from mpifed.cli.main import main; main(sys.argv[1:])"
    out = tmp_path / "r.png"
    _one_line_error(run([sys.executable, "-c", program, "report", str(runs[0]), "--png", str(out)], timeout=60),
                    "pip install 'mpifed[report]'")
    assert not out.exists()


def _config(**sections):
    from mpifed import configfile

    return configfile.from_dict(sections)


def test_labels_name_the_key_settings():
    from mpifed.report import Run, label, unique_labels

    assert label(_config()) == "2 fac x 2 ranks, replica, H=20, fedavg, fp32"
    four = _config(train={"local_steps": 25}, federation={"outer": "diloco", "compress": "int8"},
                   facility=[{"name": f"f{i}"} for i in range(4)])
    assert label(four) == "4 fac x 1 rank, replica, H=25, diloco, int8"
    mixed = _config(federation={"compress": "bf16", "outer": "fedadam"},
                    facility=[{"name": "lumi", "ranks": 4, "engine": "fsdp"}, {"name": "leo", "ranks": 2},
                              {"name": "jsc", "ranks": 2, "engine": "fsdp"}])
    assert label(mixed) == "3 fac, 4+2+2 ranks, fsdp+replica, H=20, fedadam, bf16"

    same = [Run(Path("/a/x"), four, []), Run(Path("/b/y"), four, []), Run(Path("/c/z"), mixed, [])]
    assert unique_labels(same) == ["4 fac x 1 rank, replica, H=25, diloco, int8 (x)",
                                   "4 fac x 1 rank, replica, H=25, diloco, int8 (y)", label(mixed)]
    twins = [Run(Path("/a/run"), four, []), Run(Path("/b/run"), four, [])]
    assert unique_labels(twins) == [f"{label(four)} (/a/run)", f"{label(four)} (/b/run)"]
    assert unique_labels([Run(Path("/a/untitled"), None, [])]) == ["untitled"]


def test_rounds_are_read_in_order_and_the_final_loss_is_the_last_evaluated(tmp_path):
    from mpifed.report import ReportError, Run, read_metrics, summary

    base = {"train_loss": 5.0, "tokens_total": 10, "sync_s": 0.1, "idle_s": 0.0, "ckpt_s": 0.0,
            "bytes_inter": 2_000_000, "wall_s": 1.5}
    path = tmp_path / "metrics.jsonl"
    path.write_text("\n".join(json.dumps({**base, **extra}) for extra in (
        {"round": 3, "val_loss": None, "tokens_total": 30}, {"round": 1, "val_loss": 4.0},
        {"round": 2, "val_loss": 3.5, "facility_val_loss": {"a": 3.6}})) + "\n")
    rounds = read_metrics(path)
    assert [r.round for r in rounds] == [1, 2, 3]
    row = summary(Run(tmp_path, None, rounds, label="x"))
    assert row["val_loss"] == "3.5000 (round 2)" and row["tokens"] == "30"
    assert row["mb_between_sites"] == "6.00" and row["wall_s"] == "4.5"
    path.write_text(json.dumps({**base, "round": 1, "wall_s": "slow"}) + "\n")
    with pytest.raises(ReportError, match=r"line 1: expected numbers for wall_s"):
        read_metrics(path)


def test_the_gap_to_the_first_run_is_taken_at_equal_tokens(tmp_path):
    """A run evaluated at other token counts than the reference is compared with the reference's loss
    interpolated between its evaluations; rounds outside the reference's span are left out."""
    from mpifed.report import Run
    from mpifed.report.runs import Round, perplexity_ratio

    def run(points: list[tuple[int, float | None]]) -> Run:
        return Run(tmp_path, None, [Round(round=i + 1, train_loss=1.0, val_loss=loss, tokens_total=tokens, sync_s=0.0,
                                          idle_s=0.0, ckpt_s=0.0, bytes_inter=0, wall_s=1.0)
                                    for i, (tokens, loss) in enumerate(points)])

    reference = run([(100, 4.0), (200, 3.0), (300, None), (400, 2.0)])
    other = run([(50, 5.0), (150, 3.9), (300, 2.7), (400, 2.2), (500, 2.0)])
    tokens, ratio = perplexity_ratio(other, reference)
    assert tokens.tolist() == [150, 300, 400]
    expected = [math.exp(3.9) / math.exp(3.5), math.exp(2.7) / math.exp(2.5), math.exp(2.2) / math.exp(2.0)]
    assert ratio.tolist() == pytest.approx(expected, rel=1e-12)
    tokens, ratio = perplexity_ratio(reference, reference)
    assert tokens.tolist() == [100, 200, 400] and ratio.tolist() == [1.0, 1.0, 1.0]
