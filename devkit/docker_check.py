"""`python -m devkit docker-check ...`: the host's side of `make docker-test` (docker/test/run.sh).

The system under test runs in containers; this writes what they read (the demo's photos and
manifest) and checks from outside what they wrote: every image of a batch is in S3 with the
sha256 that SQL records, and a job sent through the HTTP API comes back as an image.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from devkit.demo import DEMO_SIZE_PX, write_manifest, write_reference_photos

# Imported where used: boto3 and httpx are slow to import, and every `python -m devkit` command loads this.
if TYPE_CHECKING:
    import httpx

    from shared.storage import ObjectStore

API_JOB_STEPS = 2
POLL_S = 0.5
ENDED = ("succeeded", "failed", "canceled")


class CheckFailed(RuntimeError):
    """Raised when what the containers wrote is not what the test expects; the message says what differs."""


def register(subparsers: Any) -> None:
    """Add `docker-check` with its actions `inputs`, `wait-s3`, `outputs` and `api-job`."""
    p: argparse.ArgumentParser = subparsers.add_parser("docker-check", help="the host's side of make docker-test")
    actions = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    inputs = actions.add_parser("inputs", help="write the demo's three photos and a manifest over them")
    inputs.add_argument("dir", type=Path)
    inputs.add_argument("--jobs-per-reference", type=int, default=4)
    inputs.set_defaults(func=_reporting(_cmd_inputs))
    for name, func, text in (
        ("wait-s3", _cmd_wait_s3, "wait until the S3 endpoint stores and returns an object"),
        ("outputs", _cmd_outputs, "check `ipab results` lines (stdin) against the objects in S3"),
    ):
        action = actions.add_parser(name, help=text)
        action.add_argument("--s3", required=True, help="S3 endpoint URL")
        action.add_argument("--bucket", default="ipab")
        action.add_argument("--expect", type=int, default=0, help="how many jobs the batch has")
        action.add_argument("--timeout-s", type=float, default=60.0)
        action.set_defaults(func=_reporting(func))
    api = actions.add_parser("api-job", help="upload a reference, POST /v1/jobs, poll, fetch the image")
    api.add_argument("--api", required=True, help="the API's base URL")
    api.add_argument("--key", required=True, help="an API key (`ipab keys create`)")
    api.add_argument("--reference", type=Path, required=True)
    api.add_argument("--timeout-s", type=float, default=300.0)
    api.set_defaults(func=_reporting(_cmd_api_job))


Command = Callable[[argparse.Namespace], int]


def _reporting(command: Command) -> Command:
    """`command`, with a failed check as one line on stderr and exit status 1."""

    def run(args: argparse.Namespace) -> int:
        try:
            return command(args)
        except CheckFailed as e:
            print(f"docker-check {args.action}: FAILED: {e}", file=sys.stderr)
            return 1

    return run


def _cmd_inputs(args: argparse.Namespace) -> int:
    refs = write_reference_photos(args.dir / "references")
    count = write_manifest(args.dir / "manifest.jsonl", refs, per_reference=args.jobs_per_reference)
    print(f"wrote {count} rows over {len(refs)} photos to {args.dir / 'manifest.jsonl'}")
    return 0


def _cmd_wait_s3(args: argparse.Namespace) -> int:
    from shared.storage import ObjectStore

    store = ObjectStore(endpoint_url=args.s3, bucket=args.bucket, region="us-east-1")
    deadline = time.monotonic() + args.timeout_s
    while True:
        try:
            store.ensure_bucket()
            store.put("docker-test/probe", b"ok")
            if store.get("docker-test/probe") == b"ok":
                return 0
        except Exception as e:  # any failure means "not yet": SeaweedFS starts its parts one by one
            if time.monotonic() > deadline:
                raise CheckFailed(f"S3 at {args.s3} did not answer within {args.timeout_s} s: {e}") from e
        time.sleep(POLL_S)


def _cmd_outputs(args: argparse.Namespace) -> int:
    rows = [json.loads(line) for line in sys.stdin if line.strip()]
    if len(rows) != args.expect:
        raise CheckFailed(f"`ipab results` gave {len(rows)} jobs, expected {args.expect}")
    from shared.storage import ObjectStore

    store = ObjectStore(endpoint_url=args.s3, bucket=args.bucket, region="us-east-1")
    for row in rows:
        _check_output(store, row)
    print(f"{len(rows)} jobs succeeded; each image is in s3://{args.bucket} with the sha256 SQL records")
    return 0


def _check_output(store: ObjectStore, row: dict[str, Any]) -> None:
    job, uri = row["job_id"], row["output_uri"]
    if row["status"] != "succeeded" or not uri:
        raise CheckFailed(f"job {job}: status {row['status']!r}, output {uri!r}, error {row.get('error')!r}")
    prefix = f"s3://{store.bucket}/"
    if not uri.startswith(prefix):
        raise CheckFailed(f"job {job}: output_uri {uri!r} is not in bucket {store.bucket!r}")
    digest = hashlib.sha256(store.get(uri.removeprefix(prefix))).hexdigest()
    if digest != row["output_sha256"]:
        raise CheckFailed(f"job {job}: {uri} has sha256 {digest}, SQL records {row['output_sha256']}")


def _cmd_api_job(args: argparse.Namespace) -> int:
    import httpx

    logging.getLogger("httpx").setLevel(logging.WARNING)  # a line per poll otherwise
    headers = {"Authorization": f"Bearer {args.key}"}
    with httpx.Client(base_url=args.api, headers=headers, timeout=30.0) as client:
        # 1. Upload the reference; its id is its sha256.
        with args.reference.open("rb") as f:
            ref = _ok(client.post("/v1/references", files={"file": (args.reference.name, f, "image/png")}))["id"]
        # 2. Submit one small job.
        size = {"width": DEMO_SIZE_PX, "height": DEMO_SIZE_PX, "steps": API_JOB_STEPS}
        body = {"references": [ref], "prompt": "a watercolor painting", **size}
        # With an Idempotency-Key, on PostgreSQL: the replay answers the same job and creates nothing.
        keyed = {"Idempotency-Key": f"docker-test-{uuid.uuid4().hex}"}
        job_id = _ok(client.post("/v1/jobs", json=body, headers=keyed))["id"]
        again = _ok(client.post("/v1/jobs", json=body, headers=keyed))["id"]
        if again != job_id:
            raise CheckFailed(f"a replayed POST /v1/jobs made job {again}, not {job_id}")
        # 3. Poll until it ends.
        job = _wait_for_job(client, job_id, timeout_s=args.timeout_s)
        if job["status"] != "succeeded":
            raise CheckFailed(f"API job {job_id} ended {job['status']!r}: {job.get('error')}")
        # 4. Fetch the image (a redirect to its presigned S3 URL) and compare it with the record.
        image = client.get(f"/v1/jobs/{job_id}/image", follow_redirects=True)
        image.raise_for_status()
    digest = hashlib.sha256(image.content).hexdigest()
    if digest != job["output_sha256"] or not image.content.startswith(b"\x89PNG"):
        raise CheckFailed(
            f"API job {job_id}: fetched {len(image.content)} bytes with sha256 {digest}, "
            f"the job records {job['output_sha256']}"
        )
    print(f"API job {job_id} succeeded; its image ({len(image.content)} bytes PNG) matches its sha256")
    return 0


def _wait_for_job(client: httpx.Client, job_id: str, *, timeout_s: float) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    while True:
        job = _ok(client.get(f"/v1/jobs/{job_id}"))
        if job["status"] in ENDED:
            return job
        if time.monotonic() > deadline:
            raise CheckFailed(f"API job {job_id} still {job['status']!r} after {timeout_s} s")
        time.sleep(POLL_S)


def _ok(response: httpx.Response) -> dict[str, Any]:
    if response.status_code >= 300:
        raise CheckFailed(f"{response.request.method} {response.request.url}: {response.status_code} {response.text}")
    body: dict[str, Any] = response.json()
    return body
