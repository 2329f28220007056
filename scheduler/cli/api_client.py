"""The CLI as an API client: `ipab submit|status|results --api URL`, with the key from IPAB_API_KEY.

Needs no SQL, Redis or S3 credentials. `submit` uploads each distinct local reference once
(POST /v1/references), then posts the rows as one JSONL batch; the batch id is printed
alone on the last line, as the direct `ipab submit` does.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import Mapping
from http.client import HTTPMessage
from pathlib import Path
from typing import IO, Any, Final

from scheduler.cli.common import final_line
from scheduler.submission.manifest import REFERENCE_FIELD, Problem, parse_defaults, read_raw_rows
from shared.errors import InvalidInput, IpabError
from shared.settings import load_settings

TIMEOUT_S: Final = 300.0


class ApiError(IpabError):
    """Raised when the API answers with an error (its problem detail is the message)."""


class _Redirected(Exception):
    """Raised by the opener instead of following a redirect; `Client.request` turns it into `ApiError`."""

    def __init__(self, code: int, location: str) -> None:
        super().__init__(code, location)
        self.code = code
        self.location = location


class _RefuseRedirects(urllib.request.HTTPRedirectHandler):
    """Refuses every redirect: urllib follows one with the request's headers, Authorization
    included, which would hand the API key to whatever host the Location names."""

    def redirect_request(
        self, req: urllib.request.Request, fp: IO[bytes], code: int, msg: str, headers: HTTPMessage, newurl: str
    ) -> urllib.request.Request | None:
        fp.close()
        raise _Redirected(code, newurl)


_OPENER: Final = urllib.request.build_opener(_RefuseRedirects)


class Client:
    """A minimal HTTP client of the ipab API (urllib, no extra dependency); never follows a redirect."""

    def __init__(self, base_url: str, key: str) -> None:
        self.base_url = base_url.rstrip("/")
        self.key = key

    def request(self, method: str, path: str, *, body: bytes | None = None, content_type: str | None = None) -> bytes:
        """The response body of a 2xx; `ApiError` with the problem's detail otherwise."""
        headers = {"Authorization": f"Bearer {self.key}"}
        if content_type:
            headers["Content-Type"] = content_type
        if method == "POST":
            headers["Idempotency-Key"] = str(uuid.uuid4())
        req = urllib.request.Request(self.base_url + path, data=body, method=method, headers=headers)
        try:
            with _OPENER.open(req, timeout=TIMEOUT_S) as response:
                data: bytes = response.read()
                return data
        except _Redirected as e:
            raise ApiError(_redirect_text(e, self.base_url, path)) from None
        except urllib.error.HTTPError as e:
            raise ApiError(_problem_text(e.code, e.read())) from None
        except urllib.error.URLError as e:
            raise ApiError(f"the API at {self.base_url} is unreachable: {e.reason}") from None

    def json(self, method: str, path: str, **kwargs: Any) -> Any:
        """The JSON of a 2xx response."""
        return json.loads(self.request(method, path, **kwargs))

    def upload(self, path: Path) -> str:
        """POST /v1/references with the file; its id."""
        boundary = uuid.uuid4().hex
        head = f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{path.name}"\r\n\r\n'
        body = head.encode() + path.read_bytes() + f"\r\n--{boundary}--\r\n".encode()
        found = self.json("POST", "/v1/references", body=body, content_type=f"multipart/form-data; boundary={boundary}")
        return str(found["id"])


def _redirect_text(redirect: _Redirected, base_url: str, path: str) -> str:
    """Names the target, and the --api value that reaches the API directly (the target less the path)."""
    target = redirect.location
    base = target.removesuffix(path) if path else target
    return (
        f"{base_url + path} answered HTTP {redirect.code}, a redirect to {target}; the API key is never sent "
        f"to a redirect target: use the final URL in --api (--api {base})"
    )


def _problem_text(status: int, data: bytes) -> str:
    try:
        problem = json.loads(data)
        return f"HTTP {status}: {problem.get('detail', problem)}"
    except ValueError:
        return f"HTTP {status}: {data[:300]!r}"


def client_from(args: argparse.Namespace) -> Client:
    """The client for `--api URL`, keyed by IPAB_API_KEY."""
    key = load_settings().api_key
    if not key:
        raise InvalidInput("IPAB_API_KEY", None, "is needed with --api: set it to a key from `ipab keys create`")
    return Client(args.api, key)


def _api_rows(client: Client, path: Path, defaults: Mapping[str, Any]) -> tuple[list[dict[str, Any]], list[int]]:
    uploaded: dict[Path, str] = {}
    rows, lines = [], []
    for line, raw in read_raw_rows(path):
        if isinstance(raw, Problem):
            raise InvalidInput(raw.field, f"line {line}", raw.reason)
        row = {**defaults, **raw}
        refs = row.pop(REFERENCE_FIELD, None)
        if refs is not None:
            parts = refs.split("|") if isinstance(refs, str) else refs
            files = [(path.parent / str(p).strip()).resolve() for p in parts]
            row["references"] = [
                uploaded.setdefault(f, client.upload(f)) if f not in uploaded else uploaded[f] for f in files
            ]
        rows.append(row)
        lines.append(line)
    return rows, lines


def cmd_submit(args: argparse.Namespace) -> int:
    """Upload the manifest's references, then post its rows as one batch."""
    client = client_from(args)
    rows, _ = _api_rows(client, Path(args.manifest), parse_defaults(args.set))
    body = "\n".join(json.dumps(row, ensure_ascii=False) for row in rows).encode()
    params = {"skip_invalid": "true"} if args.skip_invalid else {}
    if getattr(args, "expires_after", None) is not None:
        params["expires_after"] = args.expires_after
    query = "?" + urllib.parse.urlencode(params) if params else ""
    try:
        created = client.json("POST", "/v1/batches" + query, body=body, content_type="application/jsonl")
    except ApiError as e:
        print(f"ipab: error: {e}", file=sys.stderr)
        print("nothing submitted. Fix the rows, or pass --skip-invalid", file=sys.stderr)
        return 2
    for problem in created.get("invalid", []):  # the server lists the first 100 and counts the rest
        print(f"line {problem['line']}: {problem['field']}: {problem['reason']}", file=sys.stderr)
    if created.get("invalid_count", 0) > len(created.get("invalid", [])):
        more = created["invalid_count"] - len(created["invalid"])
        print(f"... and {more} more problem(s) not listed", file=sys.stderr)
    print(f"batch {created['id']}: {created['added']} job(s) added")
    if not getattr(args, "watch", False):
        print(created["id"])
        return 0
    sys.stdout.flush()
    batch = _watched(client, created["id"], args.interval)
    print(final_line(batch["counts"]))
    print(created["id"])
    return 1 if batch["counts"].get("failed") else 0


def _batch(client: Client, batch_id: str) -> dict[str, Any]:
    found: dict[str, Any] = client.json("GET", f"/v1/batches/{urllib.parse.quote(batch_id, safe='')}")
    return found


def _watched(client: Client, batch_id: str, interval_s: float) -> dict[str, Any]:
    """The batch once every job is final, read every `interval_s`."""
    batch = _batch(client, batch_id)
    while batch["status"] == "in_progress":
        time.sleep(interval_s)
        batch = _batch(client, batch_id)
    return batch


def cmd_status(args: argparse.Namespace) -> int:
    """Counts per status; with --watch, until every job is final."""
    client = client_from(args)
    batch = _watched(client, args.batch, args.interval) if args.watch else _batch(client, args.batch)
    print(f"batch {batch['id']}, model set {batch['model_set']}: {batch['status']}")
    for status, count in batch["counts"].items():
        print(f"  {status:<10} {count:>8}")
    print(f"  {'total':<10} {batch['total']:>8}")
    return 1 if args.watch and batch["counts"].get("failed") else 0


def cmd_results(args: argparse.Namespace) -> int:
    """The batch's results as JSON lines, as the API returns them."""
    client = client_from(args)
    query = f"?status={args.status}" if args.status else ""
    data = client.request("GET", f"/v1/batches/{urllib.parse.quote(args.batch, safe='')}/results{query}")
    sys.stdout.write(data.decode())
    return 0
