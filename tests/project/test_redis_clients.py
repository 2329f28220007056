"""Every Redis client of the product is made by `shared.redis_conn`, with a named timeout profile."""

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PACKAGES = ("ipab", "scheduler", "shared", "worker")
CONSTRUCTORS = {"Redis", "StrictRedis"}


def _dotted(node: ast.expr) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return f"{_dotted(node.value)}.{node.attr}"
    return "?"


def clients_made(source: str) -> list[int]:
    """Lines of `source` that call redis-py's constructors: `Redis(...)`, `Redis.from_url(...)`,
    `redis.from_url(...)`, sync or asyncio, however imported."""
    lines = []
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.Call):
            continue
        parts = _dotted(node.func).split(".")
        if parts[-1] in CONSTRUCTORS or (parts[-1] == "from_url" and (parts[-2:-1] in (["Redis"], ["redis"]))):
            lines.append(node.lineno)
    return lines


def test_no_module_but_redis_conn_makes_a_redis_client() -> None:
    found = [
        f"{path.relative_to(REPO)}:{line}"
        for package in PACKAGES
        for path in sorted((REPO / package).rglob("*.py"))
        if path != REPO / "shared" / "redis_conn.py"
        for line in clients_made(path.read_text())
    ]
    assert found == [], "make Redis clients with shared.redis_conn.connect_redis and a profile: " + ", ".join(found)


def test_the_scan_finds_a_client_made_by_hand() -> None:
    assert clients_made("client = redis.Redis.from_url(url, socket_timeout=5)") == [1]
    assert clients_made("import redis.asyncio\nc = redis.asyncio.Redis(host='x')") == [2]
    assert clients_made("from redis import StrictRedis\nc = StrictRedis()") == [2]
    assert clients_made("c = redis.from_url(url)") == [1]
    assert clients_made("c = connect_redis(url, profile=PING)  # Redis (x)") == []
