"""The import layers of DESIGN.md section 2, enforced by scanning imports (ast).

A module may import modules of its own layer or lower; ``engine`` and
``kernels`` never import each other, except ``engine/explain`` and
``engine/integrations``, which sit on top of both. Kernels import numba only
in ``kernels/_jit.py``.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

LAYERS = {
    "engine.errors": 0,
    "engine._env": 0,
    "engine._state": 0,
    "engine.telemetry": 0,
    "engine.config": 1,
    "engine._context": 1,
    "engine._chunks": 1,
    "engine.forksafe": 1,
    "engine.payload": 2,
    "engine._attach": 2,
    "engine._leases": 2,
    "engine._shm": 2,
    "engine._wire": 2,
    "engine._worker": 2,
    "engine._supervisor_main": 2,
    "engine._winjob": 2,
    "engine.supervisor": 3,
    "engine.strategies.base": 3,
    "engine.strategies": 4,
    "engine.auto": 4,
    "engine._planner": 4,
    "engine.executor": 5,
    "engine._auto_runs": 5,
    "engine.explain": 6,
    "engine.integrations": 6,
    "engine": 7,
    "engine.__main__": 7,
}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _layer(module: str) -> int | None:
    """Layer of ``module``: its own entry, else its closest listed package."""
    parts = module.split(".")
    while parts:
        name = ".".join(parts)
        if name in LAYERS:
            return LAYERS[name]
        parts.pop()
    return None


def _imports(path: Path) -> list[str]:
    module = _module_name(path)
    is_package = path.name == "__init__.py"
    return _imports_in(path.read_text(), module, is_package=is_package)


def _imports_in(source: str, module: str, *, is_package: bool = False) -> list[str]:
    tree = ast.parse(source)
    package = module if is_package else module.rpartition(".")[0]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.extend(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                module = ".".join([*base, node.module] if node.module else base)
            else:
                module = node.module or ""
            # `from engine import payload` imports the module engine.payload,
            # not the names of the package engine.
            submodules = [
                f"{module}.{alias.name}"
                for alias in node.names
                if _is_module(f"{module}.{alias.name}")
            ]
            found.extend(submodules or [module])
    return found


def _is_module(name: str) -> bool:
    path = ROOT.joinpath(*name.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def _sources(top: str) -> list[Path]:
    return sorted((ROOT / top).rglob("*.py"))


def _is_app_layer(module: str) -> bool:
    return module.startswith(("engine.explain", "engine.integrations"))


@pytest.mark.parametrize(
    "path", _sources("engine"), ids=lambda p: str(p.relative_to(ROOT))
)
def test_engine_imports_point_down(path: Path) -> None:
    module = _module_name(path)
    own = _layer(module)
    assert own is not None, f"{module} has no layer in DESIGN.md's table"
    for imported in _imports(path):
        if imported.startswith("kernels"):
            assert _is_app_layer(module), f"{module} imports {imported}"
            continue
        if not imported.startswith("engine"):
            continue
        target = _layer(imported)
        assert target is not None, f"{imported} has no layer"
        assert target <= own, f"{module} (L{own}) imports {imported} (L{target})"


@pytest.mark.parametrize(
    "path", _sources("kernels"), ids=lambda p: str(p.relative_to(ROOT))
)
def test_kernels_import_neither_engine_nor_numba_outside_jit(path: Path) -> None:
    for imported in _imports(path):
        assert not imported.startswith("engine"), f"{path} imports {imported}"
        if imported.split(".")[0] == "numba":
            assert path.name == "_jit.py", (
                f"{path} imports numba; only kernels/_jit.py may"
            )


@pytest.mark.parametrize(
    "source",
    [
        "from engine.executor import ParallelExecutor\n",
        "from . import executor\n",
        "import engine.executor\n",
        "from engine import executor\n",
    ],
)
def test_scanner_sees_an_upward_edge(source: str) -> None:
    imported = _imports_in(source, "engine.errors")
    assert "engine.executor" in imported
    assert _layer("engine.executor") > _layer("engine.errors")


def test_only_env_reads_environ() -> None:
    for path in _sources("engine"):
        if path.name == "_env.py":
            continue
        text = path.read_text()
        for needle in ("os.environ", "os.getenv", "putenv"):
            assert needle not in text, f"{path} uses {needle}; go through engine._env"
