"""Provenance end to end: a real worker records it, `ipab results` shows it, `ipab reproduce` uses it
(a fast set's job too: its LoRA's scale is part of what must match)."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

from sqlalchemy import select

from devkit.demo import write_reference_photos
from devkit.synth import FAST_SET
from shared.db import Job, JobStatus, make_engine, make_session_factory
from shared.model_set import read_model_set, write_model_set
from shared.settings import Settings
from shared.storage import ObjectStore
from tests.system.conftest import Workers, ipab, submit, wait_for_batch, write_manifest

ADAPTER = "IP-Adapter/sdxl_models/ip-adapter_sdxl.safetensors"
FAST_SET_TOML = "model-set-fast.toml"  # devkit synth's fast set: a LoRA at scale 1.0, TCD, 4 steps, no guidance


def finished_jobs(settings: Settings, workers: Workers, tmp_path: Path) -> list[Job]:
    """Two jobs rendered by a real `ipab worker`, succeeded."""
    workers.start()
    batch_id = submit(workers, write_manifest(tmp_path, rows=2), "provenance")
    wait_for_batch(settings, batch_id, workers=workers)
    sessions = make_session_factory(make_engine(settings.database_url))
    with sessions() as session:
        jobs = list(session.scalars(select(Job).where(Job.batch_id == batch_id).order_by(Job.line)))
    assert [j.status for j in jobs] == [JobStatus.succeeded.value] * 2, workers.log_text()
    return jobs


def tampered_copy(model_set: Path, folder: Path) -> Path:
    """A copy of the model set with one byte of the adapter's weights changed."""
    shutil.copytree(model_set.parent, folder, ignore=shutil.ignore_patterns(".ipab-sha256.json"))
    adapter = folder / ADAPTER
    data = bytearray(adapter.read_bytes())
    data[-1] ^= 0x01
    adapter.write_bytes(bytes(data))
    return folder / model_set.name


def test_a_worker_job_reproduces_to_identical_bytes_and_other_weights_are_named(
    system_settings: Settings, workers: Workers, tmp_path: Path, tiny_model_set: Path
) -> None:
    job = finished_jobs(system_settings, workers, tmp_path)[0]
    adapter_sha256 = hashlib.sha256((tiny_model_set.parent / ADAPTER).read_bytes()).hexdigest()
    # 1. The record: every weight file's sha256, versions, device, dtype; `ipab results` shows it.
    results = ipab(workers.env, "results", job.batch_id, cwd=tmp_path)
    row = json.loads(results.stdout.splitlines()[0])
    assert row["provenance"] == json.loads(job.provenance or "null")
    assert row["provenance"]["files"]["ip_adapter/ip-adapter_sdxl.safetensors"] == adapter_sha256
    assert (row["provenance"]["device"], row["provenance"]["dtype"]) == ("cpu", "float32")
    # 2. Rendered again from SQL and S3 with the same weights: the same bytes.
    out = tmp_path / "again.png"
    done = ipab(workers.env, "reproduce", job.id, "--out", str(out), cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[0] == f"job {job.id}: identical bytes"
    assert out.read_bytes() == ObjectStore.from_settings(system_settings).get(job.output_key or "")
    # 3. With one byte of the adapter changed: not rendered; the file is named.
    tampered = tampered_copy(tiny_model_set, tmp_path / "tampered")
    done = ipab(workers.env, "reproduce", job.id, "--model-set", str(tampered), cwd=tmp_path)
    assert done.returncode == 1, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0] == f"job {job.id}: weights differ"
    changed_sha256 = hashlib.sha256((tmp_path / "tampered" / ADAPTER).read_bytes()).hexdigest()
    assert lines[1:] == [
        f"  ip_adapter/ip-adapter_sdxl.safetensors: sha256 {changed_sha256} here, {adapter_sha256} in the record"
    ]


def fast_job(settings: Settings, workers: Workers, fast_set: Path, folder: Path) -> Job:
    """One job rendered by a real worker of the fast set, submitted naming its toml (its [defaults] apply)."""
    workers.start(IPAB_MODEL_SET=str(fast_set))
    photo = write_reference_photos(folder / "refs")[0]
    manifest = folder / "fast.jsonl"
    manifest.write_text(json.dumps({"reference": str(photo), "prompt": "a lighthouse", "seed": 5}) + "\n")
    sets = ["--set", "width=64", "--set", "height=64", "--model-set", str(fast_set)]
    done = ipab(workers.env, "submit", str(manifest), "--batch", "fast-provenance", *sets, cwd=folder)
    assert done.returncode == 0, done.stderr
    batch_id = done.stdout.strip().splitlines()[-1]
    wait_for_batch(settings, batch_id, workers=workers)
    with make_session_factory(make_engine(settings.database_url))() as session:
        job = session.scalars(select(Job).where(Job.batch_id == batch_id)).one()
    assert job.status == JobStatus.succeeded.value, workers.log_text()
    return job


def with_lora_scale(fast_set: Path, scale: float, toml: Path) -> Path:
    """The fast set's toml again at `toml`, its LoRA at `scale`: the same files, so the same sha256s."""
    config = read_model_set(fast_set)
    write_model_set(
        toml,
        name=config.name,
        base=str(config.base),
        ip_adapter=str(config.ip_adapter),
        image_encoder=str(config.image_encoder),
        loras=[(str(lora.path), scale) for lora in config.loras],
        **FAST_SET,
    )
    return toml


def test_a_fast_sets_job_reproduces_and_another_lora_scale_is_reported_as_settings_that_differ(
    system_settings: Settings, workers: Workers, tmp_path: Path, tiny_model_set: Path
) -> None:
    fast_set = tiny_model_set.parent / FAST_SET_TOML
    job = fast_job(system_settings, workers, fast_set, tmp_path)
    provenance = json.loads(job.provenance or "null")
    assert [(lora["name"], lora["scale"]) for lora in provenance["loras"]] == [("tiny-tcd-lora", 1.0)]
    # 1. With the set it ran on: the same bytes.
    done = ipab(workers.env, "reproduce", job.id, "--model-set", str(fast_set), cwd=tmp_path)
    assert (done.returncode, done.stdout.splitlines()[0]) == (0, f"job {job.id}: identical bytes"), done.stderr
    # 2. The same files with the LoRA at half its scale: not rendered, the scale named.
    halved = with_lora_scale(fast_set, 0.5, tmp_path / "half" / "model-set.toml")
    done = ipab(workers.env, "reproduce", job.id, "--model-set", str(halved), cwd=tmp_path)
    assert done.returncode == 1, done.stderr
    assert done.stdout.splitlines() == [
        f"job {job.id}: settings differ",
        "  LoRA tiny-tcd-lora: scale 0.5 here, 1.0 in the record",
    ]
