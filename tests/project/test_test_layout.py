"""The test tree's own rule: test folders have no __init__.py, so basenames must be unique."""

from collections import defaultdict
from pathlib import Path

TESTS = Path(__file__).resolve().parents[1]


def test_no_two_test_modules_share_a_basename() -> None:
    # pytest's default import mode puts each test folder on sys.path and imports a module by its
    # basename; a second file of the same name anywhere under tests/ stops the whole collection.
    where: dict[str, list[str]] = defaultdict(list)
    for path in TESTS.rglob("*.py"):
        if path.name != "conftest.py" and ".venv" not in path.parts:
            where[path.name].append(str(path.relative_to(TESTS)))
    clashes = {name: paths for name, paths in where.items() if len(paths) > 1}
    assert clashes == {}, f"rename one of each: {clashes}"
