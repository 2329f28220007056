"""The test tree's own rules, read from the source (nothing imported): test folders have no __init__.py,
so basenames must be unique; a test module imports no other test module; shared set-up lives in
conftest.py, not in loose `*_helpers.py` modules."""

import ast
from collections import defaultdict
from pathlib import Path

TESTS = Path(__file__).resolve().parents[1]


def python_files(root: Path) -> list[Path]:
    """Every .py file under `root`, outside virtual environments."""
    return sorted(path for path in root.rglob("*.py") if ".venv" not in path.parts)


def imported_names(source: str) -> list[str]:
    """Every dotted module name the source imports, and for `from M import N` also `M.N` (N may be a module)."""
    names = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            module = "." * node.level + (node.module or "")
            names += [module, *(f"{module}.{alias.name}" for alias in node.names)]
    return names


def imports_of_test_modules(root: Path) -> list[str]:
    """`file: name` for each import under `root` whose module is a `test_*` module."""
    found = []
    for path in python_files(root):
        for name in imported_names(path.read_text()):
            if name.rsplit(".", 1)[-1].startswith("test_"):
                found.append(f"{path.relative_to(root)}: {name}")
    return found


def helper_modules(root: Path) -> list[str]:
    """Files under `root` named `*_helpers.py`."""
    return [str(path.relative_to(root)) for path in python_files(root) if path.name.endswith("_helpers.py")]


def test_no_two_test_modules_share_a_basename() -> None:
    # pytest's default import mode puts each test folder on sys.path and imports a module by its
    # basename; a second file of the same name anywhere under tests/ stops the whole collection.
    where: dict[str, list[str]] = defaultdict(list)
    for path in python_files(TESTS):
        if path.name != "conftest.py":
            where[path.name].append(str(path.relative_to(TESTS)))
    clashes = {name: paths for name, paths in where.items() if len(paths) > 1}
    assert clashes == {}, f"rename one of each: {clashes}"


def test_no_test_module_imports_another_test_module() -> None:
    # What two test modules share is a fixture or helper in their folder's conftest.py: importing a
    # test module runs it a second time and collects its imported test functions again.
    assert imports_of_test_modules(TESTS) == [], "move what is shared into the folder's conftest.py"


def test_no_loose_helper_modules() -> None:
    assert helper_modules(TESTS) == [], "move shared set-up into the folder's conftest.py (fixtures or functions)"


def test_the_rules_catch_a_test_module_import_and_a_helpers_module(tmp_path: Path) -> None:
    folder = tmp_path / "scheduler"
    folder.mkdir()
    (folder / "test_one.py").write_text("from tests.scheduler.test_two import thing\nimport pytest\n")
    (folder / "test_two.py").write_text(
        "import tests.scheduler.test_one\nfrom tests.scheduler import test_one\nfrom .test_one import x\n"
        "from tests.scheduler.conftest import make_key\n"
    )
    (folder / "conftest.py").write_text("import test_two\n")
    (folder / "api_helpers.py").write_text("")

    assert imports_of_test_modules(tmp_path) == [
        "scheduler/conftest.py: test_two",
        "scheduler/test_one.py: tests.scheduler.test_two",
        "scheduler/test_two.py: tests.scheduler.test_one",
        "scheduler/test_two.py: tests.scheduler.test_one",
        "scheduler/test_two.py: .test_one",
    ]
    assert helper_modules(tmp_path) == ["scheduler/api_helpers.py"]
