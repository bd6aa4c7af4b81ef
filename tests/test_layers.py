"""Imports point one way: kernels <- engine <- reference <- export <- calibration <- app (DESIGN.md §1).

The runtime (engine/, kernels/) imports no other stage and no third-party library outside the runtime's:
it is what a Jetson installs without torch."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
ORDER = ["errors", "kernels", "engine", "reference", "export", "calibration", "app"]  # each may import those before it
# third-party modules the runtime may import (runtime dependencies and lazily imported optional backends)
RUNTIME_THIRD_PARTY = {"numpy", "onnxruntime", "tokenizers", "PIL", "rich", "openvino", "tensorrt", "cuda", "cudart"}


def imports(path: Path) -> set[str]:
    """Every module a file imports, at any depth (lazy imports inside functions count too)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module)
            if node.module == "diffscore":  # `from diffscore import engine`
                found |= {f"diffscore.{a.name}" for a in node.names}
    return found


def stage_files(stage: str) -> list[Path]:
    return [REPO / f"{stage}.py"] if (REPO / f"{stage}.py").is_file() else sorted((REPO / stage).rglob("*.py"))


@pytest.mark.parametrize("stage", ORDER)
def test_imports_point_one_way(stage):
    allowed = set(ORDER[: ORDER.index(stage) + 1])
    wrong = [f"{path.relative_to(REPO)} imports {module}"
             for path in stage_files(stage) for module in sorted(imports(path))
             if module.startswith("diffscore.") and module.split(".")[1] in ORDER
             and module.split(".")[1] not in allowed]
    assert not wrong, "imports against the layer order " + " <- ".join(ORDER) + ":\n" + "\n".join(wrong)


@pytest.mark.parametrize("stage", ["errors", "kernels", "engine"])
def test_runtime_imports_only_runtime_libraries(stage):
    stdlib = set(sys.stdlib_module_names)
    wrong = [f"{path.relative_to(REPO)} imports {module}"
             for path in stage_files(stage) for module in sorted(imports(path))
             if module.split(".")[0] not in stdlib | RUNTIME_THIRD_PARTY | {"diffscore"}]
    assert not wrong, "the runtime may import only " + ", ".join(sorted(RUNTIME_THIRD_PARTY)) + ":\n" + "\n".join(wrong)


def test_the_checker_sees_a_wrong_import(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    from diffscore.export.onnx_export import export_engine\n    import torch\n")
    assert {"diffscore.export.onnx_export", "torch"} <= imports(bad)
