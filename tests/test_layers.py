"""The import rule of docs/architecture.md: every arrow points down, and Ray stays in its adapters.

Every ``rcat_ray`` import (module level or inside a function) goes to the same or a lower level of
:data:`LEVELS`, and never between two folders of :data:`APART`. Outside its own folder a
``ray_*.py`` adapter is reached through the folder's ``run.py``. Every module other than the ``ray_*.py``
adapters and ``runtime/`` imports in a fresh interpreter without loading Ray. ``ruff`` (rule TID251, configured
in pyproject.toml) bans ``import ray`` outside those files; the last test runs that rule so ``make test`` holds it.

Known exceptions are listed below, each with its reason; an entry that no longer matches anything fails, so
the lists only shrink.
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "rcat_ray"

#: Levels from the bottom. A module may import its own level and any lower one, never a higher one.
#: bench/ and jobs/ sit above all of these and may import anything.
LEVELS: tuple[tuple[str, ...], ...] = (
    ("errors",),  # 0: the error hierarchy, a leaf
    ("config",),  # 1: shared config types
    ("core", "runtime"),  # 2: the Ray-free method | Ray start, quiet mode, interrupts, allocator, test hooks
    ("store",),  # 3: the result store
    ("evaluate", "finetune"),  # 4: the two things that attack or train
    ("report",),  # 5: pages over stored results
    ("sweep", "nightly"),  # 6: workflows built from evaluate, finetune and report
    ("demo", "study"),  # 7: the embedded default | the paper's experiment over many pairs
    ("cli",),  # 8: rcat-ray: its parser (flags derived from the config models), handlers, exit codes
)
#: Folders on one level that never import each other.
APART: tuple[frozenset[str], ...] = (
    frozenset({"core", "runtime"}),
    frozenset({"evaluate", "finetune"}),
    frozenset({"sweep", "nightly"}),
    frozenset({"demo", "study"}),
)
LEVEL_OF = {unit: level for level, units in enumerate(LEVELS) for unit in units}

#: (importing folder, imported module) -> why the arrow against the levels is still there.
LAYER_EXCEPTIONS: dict[tuple[str, str], str] = {}

#: (importing folder, imported adapter) -> why it does not go through the adapter folder's run.py.
ADAPTER_EXCEPTIONS: dict[tuple[str, str], str] = {
    ("sweep", "rcat_ray.finetune.ray_train"): (
        "a Tune trial runs the fine-tuning loop itself (finetune_loop, train_run): adapter to adapter, both Ray"
    ),
}

#: Modules (dotted) that may load Ray when imported, besides ray_*.py and runtime/, with the reason.
RAY_IMPORT_EXCEPTIONS: dict[str, str] = {}


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _unit(module: str) -> str:
    """The folder (or top-level module) a dotted ``rcat_ray`` module belongs to; '' for the package itself."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def _is_adapter(module: str) -> bool:
    return module.rsplit(".", 1)[-1].startswith("ray_")


def _package_files() -> list[Path]:
    return sorted(p for p in PACKAGE.rglob("*.py") if "__pycache__" not in p.parts)


def _known_modules() -> set[str]:
    return {_module_name(p) for p in _package_files()}


def _imports(path: Path, known: set[str]) -> list[tuple[int, str]]:
    """(line, dotted target) of every import in a file, functions included; ``from pkg import mod`` names mod."""
    module = _module_name(path)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: list[tuple[int, str]] = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            found.extend((node.lineno, alias.name) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                target = ".".join([*base, node.module] if node.module else base)
            else:
                target = node.module or ""
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                found.append((node.lineno, sub if sub in known else target))
    return found


def _rel(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


def test_levels_name_every_folder() -> None:
    """A new folder or top-level module must be given a level before it can import anything."""
    units = {_unit(_module_name(p)) for p in _package_files()} - {""}
    unplaced = sorted(units - set(LEVEL_OF))
    assert not unplaced, f"rcat_ray folders or modules without a level in LEVELS (tests/test_layers.py): {unplaced}"


def test_imports_point_down() -> None:
    known = _known_modules()
    violations, used = [], set()
    for path in _package_files():
        source = _module_name(path)
        src_unit = _unit(source)
        if src_unit not in LEVEL_OF:
            continue  # the package's own __init__ (imports nothing), or a unit the test above reports
        for line, target in _imports(path, known):
            top = target.split(".")[0]
            if top in ("bench", "jobs", "tests"):
                violations.append(f"{_rel(path)}:{line}: imports {target} (the package never imports {top}/)")
                continue
            if top != "rcat_ray" or target == "rcat_ray":
                continue
            dst_unit = _unit(target)
            dst_level = LEVEL_OF.get(dst_unit, len(LEVELS))
            if dst_level < LEVEL_OF[src_unit] or dst_unit == src_unit:
                continue
            if dst_level == LEVEL_OF[src_unit] and frozenset({src_unit, dst_unit}) not in APART:
                continue
            key = (src_unit, target)
            if key in LAYER_EXCEPTIONS:
                used.add(key)
                continue
            how = "between folders kept apart" if dst_level == LEVEL_OF[src_unit] else "up"
            violations.append(
                f"{_rel(path)}:{line}: {src_unit} (level {LEVEL_OF[src_unit]}) imports {target} "
                f"({dst_unit}, level {LEVEL_OF.get(dst_unit)}): {how}"
            )
    stale = sorted(set(LAYER_EXCEPTIONS) - used)
    violations = list(dict.fromkeys(violations))  # one line per import statement, not per imported name
    assert not violations, "imports against the levels of docs/architecture.md:\n" + "\n".join(violations)
    assert not stale, f"LAYER_EXCEPTIONS entries that no longer occur (remove them): {stale}"


def test_adapters_reached_through_run() -> None:
    """Code outside a capability folder calls its run.py, which imports the folder's ray_*.py adapters lazily."""
    known = _known_modules()
    violations, used = [], set()
    for path in _package_files():
        source = _module_name(path)
        for line, target in _imports(path, known):
            if not target.startswith("rcat_ray.") or not _is_adapter(target):
                continue
            if target.rpartition(".")[0] == source.rpartition(".")[0]:
                continue  # its own folder (run.py, another adapter, the folder's __init__)
            key = (_unit(source), target)
            if key in ADAPTER_EXCEPTIONS:
                used.add(key)
                continue
            violations.append(f"{_rel(path)}:{line}: imports the adapter {target}; call its folder's run.py")
    stale = sorted(set(ADAPTER_EXCEPTIONS) - used)
    violations = list(dict.fromkeys(violations))
    assert not violations, "ray_*.py adapters imported from outside their folder:\n" + "\n".join(violations)
    assert not stale, f"ADAPTER_EXCEPTIONS entries that no longer occur (remove them): {stale}"


# Runs in a fresh interpreter. The parent imports each module only after a forked child has imported it alone
# and found Ray absent, so every child starts from Ray-free modules and one offender does not hide the next.
_PROBE = textwrap.dedent(
    """
    import importlib, json, os, sys, traceback

    class _Witness:
        # Remembers where the first ``import ray`` came from, and lets the import go on.
        where = None
        def find_spec(self, name, path=None, target=None):
            if (name == "ray" or name.startswith("ray.")) and _Witness.where is None:
                frames = [f for f in traceback.extract_stack() if "/rcat_ray/" in f.filename]
                _Witness.where = f"{frames[-1].filename}:{frames[-1].lineno}" if frames else "?"
            return None

    results = {}
    for name in json.loads(sys.argv[1]):
        read, write = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(read)
            sys.meta_path.insert(0, _Witness())
            try:
                importlib.import_module(name)
                out = {"ray": "ray" in sys.modules, "where": _Witness.where}
            except BaseException as err:
                out = {"error": f"{type(err).__name__}: {err}"}
            os.write(write, json.dumps(out).encode())
            os._exit(0)
        os.close(write)
        with os.fdopen(read, "rb") as pipe:
            data = pipe.read()
        os.waitpid(pid, 0)
        results[name] = json.loads(data) if data else {"error": "the child died"}
        if results[name].get("ray") is False:
            importlib.import_module(name)
    print(json.dumps(results))
    """
)


def _ray_free_candidates() -> list[str]:
    names = []
    for path in _package_files():
        name = _module_name(path)
        if _is_adapter(name) or name == "rcat_ray.runtime" or name.startswith("rcat_ray.runtime."):
            continue
        if name.endswith(".__main__"):  # runs the CLI when imported; rcat_ray.cli.main is checked instead
            continue
        names.append(name)
    return names


@pytest.mark.timeout(300)
def test_modules_import_without_ray() -> None:
    names = _ray_free_candidates()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run(
        [sys.executable, "-c", _PROBE, json.dumps(names)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=280,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    errors = [f"{name}: {r['error']}" for name, r in results.items() if "error" in r]
    loaded = {name: r["where"] for name, r in results.items() if r.get("ray")}
    unexpected = [f"{name} (ray imported at {at})" for name, at in loaded.items() if name not in RAY_IMPORT_EXCEPTIONS]
    stale = sorted(set(RAY_IMPORT_EXCEPTIONS) - set(loaded))
    assert not errors, "modules that do not import:\n" + "\n".join(errors)
    assert not unexpected, "importing these loads Ray (move the import into a ray_*.py or inside a function):\n" + (
        "\n".join(unexpected)
    )
    assert not stale, f"RAY_IMPORT_EXCEPTIONS entries that no longer load Ray (remove them): {stale}"


def test_ruff_bans_ray_outside_adapters() -> None:
    """The same rule as ``make lint`` (TID251 from pyproject.toml), run here so that CI's ``make test`` holds it."""
    paths = ["rcat_ray", "jobs", "tests", "bench"]  # the Makefile's lint target
    proc = subprocess.run(
        [sys.executable, "-m", "ruff", "check", "--no-cache", "--select", "TID251", *paths],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]


def test_public_surfaces_resolve() -> None:
    """Every name a folder's ``__all__`` promises exists where its ``__init__`` says (they are resolved lazily)."""
    import importlib

    missing = []
    for init in sorted(PACKAGE.glob("*/__init__.py")):
        package = importlib.import_module(_module_name(init))
        where = getattr(package, "_WHERE", None)
        if where is not None and sorted(where) != sorted(package.__all__):
            missing.append(f"{package.__name__}: __all__ and _WHERE name different things")
        for name in getattr(package, "__all__", ()):
            try:
                getattr(package, name)
            except (AttributeError, ImportError) as err:
                missing.append(f"{package.__name__}.{name}: {err}")
    assert not missing, "names in __all__ that do not resolve:\n" + "\n".join(missing)
