"""The package's architecture: the core imports nothing from the tools."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).parent.parent / "src" / "ringattn"


def _imported_modules(path: Path) -> set[str]:
    """Absolute names of the ringattn modules ``path`` imports (relative imports resolved)."""
    module = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    package = module.rsplit(".", 1)[0] if path.name != "__init__.py" else module
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package.rsplit(".", node.level - 1)[0] if node.level else ""
            target = ".".join(part for part in (base, node.module) if part)
            names.add(target)
            names.update(f"{target}.{alias.name}" for alias in node.names)
    return {name for name in names if name.startswith("ringattn")}


def test_the_core_imports_nothing_from_the_tools():
    core = [
        path
        for path in PACKAGE.rglob("*.py")
        if "tools" not in path.relative_to(PACKAGE).parts and path.name != "__main__.py"
    ]
    assert len(core) > 15
    for path in core:
        imported = _imported_modules(path)
        tools = sorted(name for name in imported if name.startswith("ringattn.tools"))
        assert not tools, f"{path.relative_to(PACKAGE)} imports {tools}"


def test_the_tools_are_found_where_the_core_is_not():
    tools = {path.stem for path in (PACKAGE / "tools").glob("*.py")}
    assert {"demo", "bench", "plan", "cli", "launch", "memory", "verify"} <= tools
    assert tools & {path.stem for path in PACKAGE.glob("*.py")} == {"__init__"}
