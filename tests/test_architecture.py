"""The package's shape, read from its source and checked by running it: imports point down (no cycles,
and nothing below the round loop imports it or the command line); the light commands stay light; the
command line has one table of commands, and its choices and defaults come from the configuration."""
import ast
import json
import subprocess
import sys
from pathlib import Path

import click
import numpy as np
import pytest

from conftest import ROOT, mpifed, rank_env

PACKAGE = ROOT / "mpifed"
# The layers, bottom up: a module may import its own room, any room of a lower layer, and the package
# root (`mpifed/__init__.py`); the rooms of one layer may import each other only as long as no cycle forms.
LAYERS = [
    {"mpifed.cadence", "mpifed.config", "mpifed.configfile", "mpifed.layout", "mpifed.logs"},
    {"mpifed.comm", "mpifed.model", "mpifed.deploy"},
    {"mpifed.engines", "mpifed.federation", "mpifed.data", "mpifed.checkpoint", "mpifed.preflight", "mpifed.report",
     "mpifed.plan"},
    {"mpifed.run"},
    {"mpifed.cli", "mpifed.__main__"},
]


def _modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
        out[name.removesuffix(".__init__")] = path
    return out


def _imports(name: str, path: Path, known: set[str]) -> set[str]:
    """The package's modules that `name` imports anywhere in its source (functions and TYPE_CHECKING
    blocks included: a reader has to hold those in mind too)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:
                full = f"{node.module}.{alias.name}"
                found.add(full if full in known else node.module)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return {m for m in found if m in known and m != name and not name.startswith(m + ".")}


def _room(module: str) -> str:
    return ".".join(module.split(".")[:2])


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(name, path, set(modules)) for name, path in modules.items()}


def _cycle(graph: dict[str, set[str]]) -> list[str]:
    """One cycle of `graph` (empty when there is none), by depth-first search."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str]:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        state[node] = 2
        stack.pop()
        return []

    for start in sorted(graph):
        if start not in state and (found := visit(start)):
            return found
    return []


def test_every_import_points_down():
    graph = _graph()
    layer = {room: i for i, rooms in enumerate(LAYERS) for room in rooms}
    rooms = {_room(m) for m in graph} - {"mpifed"}
    assert rooms <= set(layer), f"rooms without a layer: {rooms - set(layer)}"
    upward = [f"{m} -> {t}" for m, targets in graph.items() for t in targets
              if _room(t) != "mpifed" and _room(m) != "mpifed" and layer[_room(t)] > layer[_room(m)]]
    assert upward == []
    assert _cycle(graph) == [], "import cycle between modules"
    room_graph: dict[str, set[str]] = {}
    for m, targets in graph.items():
        room_graph.setdefault(_room(m), set()).update(_room(t) for t in targets if _room(t) != _room(m))
    assert _cycle(room_graph) == [], "import cycle between rooms"
    # the per-rank program and the command line are the top: nothing below reaches up into them
    below = [m for m in graph if _room(m) in {"mpifed.comm", "mpifed.engines", "mpifed.federation",
                                               "mpifed.checkpoint", "mpifed.data"}]
    assert not [(m, t) for m in below for t in graph[m] if _room(t) in {"mpifed.run", "mpifed.cli"}]


def test_the_checker_finds_a_cycle():
    """The cycle search itself, on a graph that has one and one that has none."""
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) == []


def test_only_the_rank_program_reads_comm_world():
    readers = sorted(p.relative_to(ROOT).as_posix() for p in PACKAGE.rglob("*.py")
                     if any(isinstance(n, ast.Attribute) and n.attr == "COMM_WORLD" for n in ast.walk(ast.parse(p.read_text()))))
    assert readers == ["mpifed/run/rank.py"]


def test_library_code_speaks_through_the_logger():
    """Only the command line and the report print; everything else goes through mpifed.logs (levels,
    --quiet, the rank in front with --verbose). Read from the source: calls of print, not names."""
    def prints(source: str) -> bool:
        return any(isinstance(n, ast.Call) and isinstance(n.func, ast.Name) and n.func.id == "print"
                   for n in ast.walk(ast.parse(source)))

    assert prints("if x:\n    print('y', flush=True)") and not prints("def fingerprint(self):\n    return 1")
    printers = sorted(p.relative_to(ROOT).as_posix() for p in PACKAGE.rglob("*.py") if prints(p.read_text()))
    assert all(p.startswith(("mpifed/cli/", "mpifed/report/")) for p in printers), printers


def _modules_loaded_by(args: list[str]) -> tuple[subprocess.CompletedProcess, list[str]]:
    """Run `mpifed ARGS` in a fresh interpreter; returns its result and the heavy modules it had loaded."""
    probe = ("import atexit, sys\n"
             "atexit.register(lambda: sys.stderr.write('LOADED ' + ' '.join(sorted(m for m in sys.modules\n"
             "    if m in ('torch', 'transformers', 'mpi4py.MPI', 'deepspeed'))) + '\\n'))\n"
             "from mpifed.cli.main import main\n"
             f"main({args!r})\n")
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=rank_env(), timeout=120)
    line = [l for l in result.stderr.splitlines() if l.startswith("LOADED")][-1]
    return result, line.split()[1:]


def test_file_commands_do_not_load_torch_or_mpi(tmp_path):
    from mpifed.checkpoint import format as checkpoint
    from mpifed.layout import FlatLayout

    layout = FlatLayout.from_parameters([("w", (3, 4), "float32")])
    checkpoint.publish(checkpoint.write_main(
        tmp_path, 1, dict(tokens=12, facilities=json.dumps([]), config="", model_config="{}"), layout,
        [(0, 12)], [], [], model=np.arange(12, dtype=np.float32), outer={}))
    for args in (["ckpt", "verify", str(tmp_path)], ["ckpt", "inspect", str(tmp_path)], ["sites", "list"],
                 ["simulate", "--help"], ["report", "--help"]):
        result, loaded = _modules_loaded_by(args)
        assert result.returncode == 0, result.stderr
        assert loaded == [], (args, loaded)
    result, _ = _modules_loaded_by(["ckpt", "verify", str(tmp_path)])
    assert "ok (round 1" in result.stdout


def test_one_table_of_commands():
    from mpifed.cli import ckpt, common, data, deploy, main, report, train

    assert set(main.cli.commands) == set(main.COMMANDS)
    reachable = set()
    for command in main.COMMANDS.values():
        reachable.add(command)
        reachable.update(getattr(command, "commands", {}).values())
    defined = {obj for module in (ckpt, common, data, deploy, report, train) for obj in vars(module).values()
               if isinstance(obj, click.Command)}
    assert defined <= reachable, f"commands defined but never registered: {defined - reachable}"
    listed = mpifed("--help").stdout.split("Commands:")[1].split()
    assert sorted(set(listed) & set(main.COMMANDS)) == sorted(main.COMMANDS)


def test_choices_and_defaults_come_from_the_configuration():
    from mpifed.cli.deploy import config_new
    from mpifed.cli.train import simulate
    from mpifed.config import Compression, FederationConfig, OuterName, TrainConfig, choices

    options = {p.name: p for p in config_new.params}
    assert tuple(options["outer"].type.choices) == choices(OuterName)
    assert tuple(options["compress"].type.choices) == choices(Compression)
    helps = {p.name: p.help for p in simulate.params if isinstance(p, click.Option)}
    assert helps["rounds"].endswith(f"[default: {FederationConfig().rounds}]")
    assert helps["local_steps"].endswith(f"[default: {TrainConfig().local_steps}]")


@pytest.mark.parametrize("module, table", [("mpifed.federation.outer", "OUTER"),
                                           ("mpifed.federation.compress", "CODECS"),
                                           ("mpifed.model", "PRESETS"), ("mpifed.engines", "_ENGINES")])
def test_each_table_of_choices_matches_its_literal(module, table):
    """A choice added to the configuration without its implementation (or the reverse) fails at import."""
    import importlib

    from mpifed import config

    loaded = importlib.import_module(module)
    alias = {"OUTER": config.OuterName, "CODECS": config.Compression, "PRESETS": config.Preset,
             "_ENGINES": config.EngineName}[table]
    assert set(getattr(loaded, table)) == set(config.choices(alias))
    with pytest.raises(AssertionError, match="the configuration allows"):
        config.check_table({**getattr(loaded, table), "extra": None}, alias, table)
