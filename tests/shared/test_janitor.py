"""The janitor: expired objects go, the record says so, shared images stay while anything uses them,
a janitor killed midway is finished by the next, and a running job is never expired under its worker."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import timedelta

import pytest
from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from shared import keys
from shared.db import Batch, BatchReference, Job, JobStatus, Plan, PlanSlot, ReferenceImage, WebhookMessage, utcnow
from shared.janitor.references import claim_references, mark_unused
from shared.jobs import JobResult, claim_job, finish_job, transaction
from shared.retention import DataState
from shared.storage import ObjectStore
from tests.shared.conftest import ENCODER, PNG_BYTES, World


def _embedding_copies(world: World) -> list[bytes]:
    return sorted(world.redis.scan_iter(match=world.settings.redis_prefix + "emb:*"))


def test_expired_outputs_are_deleted_and_the_record_says_when_with_its_metadata_kept(world: World) -> None:
    batch_id, jobs = world.batch("b", jobs=4, attempts=2)
    world.store.put(keys.output_key(batch_id, jobs[0], 1), b"an earlier attempt's output the worker did not tidy")
    world.expire(jobs[:3])

    (report,) = world.sweep()

    assert report.jobs_removed == 3 and report.objects_deleted == 3 and report.lag_s == 0.0
    assert world.keys_under(keys.outputs_prefix(batch_id)) == [keys.output_key(batch_id, jobs[3], 2)]
    for job_id in jobs[:3]:
        job = world.job(job_id)
        assert job is not None and job.data_state == DataState.removed.value
        assert job.data_removed_at is not None
        assert job.status == "succeeded" and job.output_key is not None  # the metadata stays
    kept = world.job(jobs[3])
    assert kept is not None and kept.data_state is None and kept.data_removed_at is None
    # The image is still used by the batch's kept job.
    assert world.store.exists(keys.ref_key(world.images["a"], "png"))


def test_the_lag_is_the_age_of_the_oldest_expiry_not_yet_acted_on(world: World) -> None:
    _, jobs = world.batch("b", jobs=3)
    world.expire(jobs, ago=timedelta(minutes=10))
    world.settings = world.settings.model_copy(update={"janitor_batch": 2})

    first, second = world.sweep(2)

    assert 590 <= first.lag_s <= 700 and first.more
    assert second.lag_s == 0.0 and second.jobs_removed == 1


class Killed(BaseException):
    """What a SIGKILL is to the code it interrupts: nothing after it runs."""


class DiesWhileDeleting(ObjectStore):
    """A store whose process dies after deleting the first half of what it was asked to delete."""

    def __init__(self, real: ObjectStore) -> None:
        super().__init__(endpoint_url=real.endpoint_url, bucket=real.bucket, region=real.region)

    def delete_many(self, keys: Sequence[str]) -> None:
        super().delete_many(keys[: len(keys) // 2])
        raise Killed


def test_a_janitor_killed_midway_leaves_records_saying_removing_and_the_next_one_finishes(world: World) -> None:
    batch_id, jobs = world.batch("b", jobs=6)
    world.expire(jobs)
    dying = World(world.settings, world.sessions, DiesWhileDeleting(world.store), world.redis)

    with pytest.raises(Killed):
        dying.sweep()

    # Every job whose objects may be gone says so; some objects are gone, some not yet.
    states = {job_id: getattr(world.job(job_id), "data_state", None) for job_id in jobs}
    assert set(states.values()) == {DataState.removing.value}
    assert 0 < len(world.keys_under(keys.outputs_prefix(batch_id))) < len(jobs)

    (report,) = world.sweep()

    assert report.jobs_removed == len(jobs)
    assert world.keys_under(keys.outputs_prefix(batch_id)) == []
    assert {getattr(world.job(job_id), "data_state", None) for job_id in jobs} == {DataState.removed.value}
    with world.sessions() as session:
        assert session.scalar(select(Batch.removed_count).where(Batch.id == batch_id)) == len(jobs)


def test_a_running_job_past_its_expiry_is_removed_only_once_it_finishes(world: World) -> None:
    batch_id, (job_id,) = world.batch("b", jobs=1, status=JobStatus.queued.value)
    attempt = claim_job(sessions=world.sessions, job_id=job_id, worker_host="gpu-1", lease_s=60, max_attempts=3)
    assert attempt == 1
    # Its deletion is asked for while a worker renders it: the expiry passes under the worker.
    with transaction(world.sessions) as session:
        session.execute(update(Job).where(Job.id == job_id).values(deleted_at=utcnow(), expires_at=utcnow()))
    output = keys.output_key(batch_id, job_id, attempt)
    world.store.put(output, b"png being uploaded")

    (report,) = world.sweep()

    assert report.jobs_removed == 0 and world.store.exists(output)
    running = world.job(job_id)
    assert running is not None and running.status == "running" and running.data_state is None

    result = JobResult(output_key=output, output_sha256="ab" * 32, output_bytes=18, encode_s=0, denoise_s=1, upload_s=0)
    assert finish_job(sessions=world.sessions, job_id=job_id, attempt=attempt, result=result)
    finished = world.job(job_id)
    assert finished is not None and finished.expires_at is not None and finished.expires_at <= utcnow()

    (report,) = world.sweep()

    assert report.jobs_removed == 1 and report.rows_purged == 1
    assert world.job(job_id) is None and world.keys_under(keys.outputs_prefix(batch_id)) == []


def test_a_job_that_finishes_expires_its_retention_after_finishing(world: World) -> None:
    _, (job_id,) = world.batch("b", jobs=1, status=JobStatus.queued.value, expires_after_s=7200)
    attempt = claim_job(sessions=world.sessions, job_id=job_id, worker_host="gpu-1", lease_s=60, max_attempts=3)
    assert attempt is not None
    result = JobResult(output_key="k", output_sha256="ab" * 32, output_bytes=1, encode_s=0, denoise_s=1, upload_s=0)
    assert finish_job(sessions=world.sessions, job_id=job_id, attempt=attempt, result=result)

    job = world.job(job_id)
    assert job is not None and job.expires_at is not None and job.finished_at is not None
    assert abs((job.expires_at - job.finished_at).total_seconds() - 7200) < 1
    assert world.sweep()[0].jobs_removed == 0


def test_a_shared_image_stays_while_any_batch_keeps_a_job_and_goes_with_its_embeddings_after(world: World) -> None:
    first, first_jobs = world.batch("one", jobs=2, images=("shared", "only-one"))
    _, second_jobs = world.batch("two", jobs=2, images=("shared",))
    shared, only_one = world.images["shared"], world.images["only-one"]
    world.expire(first_jobs)

    world.sweep()

    assert not world.store.exists(keys.ref_key(only_one, "png"))
    assert not world.store.exists(keys.embedding_key(ENCODER, only_one))
    assert world.store.exists(keys.ref_key(shared, "png")) and world.store.exists(keys.embedding_key(ENCODER, shared))
    assert [k for k in _embedding_copies(world) if only_one.encode() in k] == []
    with world.sessions() as session:
        assert set(session.scalars(select(ReferenceImage.sha256))) == {shared}
        links = select(func.count()).select_from(BatchReference).where(BatchReference.batch_id == first)
        assert session.scalar(links) == 0

    world.expire(second_jobs)
    world.sweep()

    assert world.keys_under("refs/") == [] and world.keys_under("embeddings/") == []
    assert _embedding_copies(world) == []


def test_a_submission_that_claims_a_marked_image_keeps_it_and_checks_its_objects(world: World) -> None:
    sha = world.image("a")
    with transaction(world.sessions) as session:
        assert mark_unused(session, [sha]) == 1  # nothing used it: the janitor's first step
    with transaction(world.sessions) as session:
        # A submission using it arrives before the second step: it clears the mark, and is told to check.
        assert claim_references(session, [sha, "f" * 64]) == {sha, "f" * 64}
        session.add(Batch(id="b" * 36, name="new", model_set="m", job_count=1))
        session.flush()
        session.add(BatchReference(batch_id="b" * 36, sha256=sha))

    world.sweep()

    assert world.store.exists(keys.ref_key(sha, "png"))
    with world.sessions() as session:
        assert session.scalar(select(ReferenceImage.removing_at).where(ReferenceImage.sha256 == sha)) is None


def test_rows_past_the_metadatas_retention_are_deleted_in_bounded_steps(world: World) -> None:
    world.settings = world.settings.model_copy(update={"retention_metadata_s": 3600, "janitor_batch": 4})
    old_batch, old = world.batch("old", jobs=6)
    recent_batch, recent = world.batch("recent", jobs=2)
    with transaction(world.sessions) as session:
        slot = {"slot_at": utcnow(), "kind": "manual", "status": "submitted", "decided_by": "t"}
        session.add(PlanSlot(plan_id=_plan(session), batch_id=old_batch, **slot))
    world.expire(old, ago=timedelta(hours=2))
    world.expire(recent, ago=timedelta(minutes=1))

    reports = world.sweep(4)

    assert sum(r.rows_purged for r in reports) == 6
    assert all(world.job(j) is None for j in old)
    assert all(getattr(world.job(j), "data_state", None) == DataState.removed.value for j in recent)
    # The batch whose every row went goes too (the table of batches does not grow for ever); its plan
    # slot says why it names no batch. The other batch keeps its rows, and itself.
    assert sum(r.batches_purged for r in reports) == 1
    with world.sessions() as session:
        assert session.get(Batch, old_batch) is None and session.get(Batch, recent_batch) is not None
        slot = session.scalars(select(PlanSlot)).one()
        assert slot.batch_id is None and slot.reason == "its batch's records passed their retention"


def _message(world: World, name: str, *, age: timedelta, delivered: bool = False, failed: bool = False) -> str:
    """A webhook message written `age` ago: delivered, given up (failed), or still to be sent; its id."""
    created = utcnow() - age
    with transaction(world.sessions) as session:
        session.add(
            WebhookMessage(
                id=f"msg_{name}",
                tenant="default",
                url="https://hooks.example.com/ipab",
                event_type="job.succeeded",
                subject_id=name,
                payload="{}",
                attempts=1,
                created_at=created,
                next_attempt_at=created,
                delivered_at=created if delivered else None,
                failed_at=created if failed else None,
            )
        )
    return f"msg_{name}"


def test_webhook_messages_sent_or_given_up_go_after_the_metadatas_retention_and_unsent_ones_stay(
    world: World,
) -> None:
    world.settings = world.settings.model_copy(update={"retention_metadata_s": 3600, "janitor_batch": 2})
    old = [_message(world, f"old{i}", age=timedelta(hours=2), delivered=True) for i in range(2)]
    given_up = _message(world, "given-up", age=timedelta(hours=2), failed=True)
    unsent = _message(world, "unsent", age=timedelta(days=30))  # still retried: never purged
    recent = _message(world, "recent", age=timedelta(minutes=5), delivered=True)

    first, second = world.sweep(2)

    assert (first.outbox_purged, first.more) == (2, True)  # bounded: IPAB_JANITOR_BATCH a step
    assert (second.outbox_purged, second.more) == (1, False)
    with world.sessions() as session:
        left = set(session.scalars(select(WebhookMessage.id)))
    assert left == {unsent, recent} and not left & {*old, given_up}


def test_without_a_metadata_retention_no_webhook_message_is_purged(world: World) -> None:
    kept = _message(world, "old", age=timedelta(days=3650), delivered=True)

    (report,) = world.sweep()

    assert report.outbox_purged == 0
    with world.sessions() as session:
        assert list(session.scalars(select(WebhookMessage.id))) == [kept]


def test_a_deleted_batch_goes_once_empty_with_the_objects_its_folder_still_held(world: World) -> None:
    batch_id, _ = world.batch("b", jobs=2)
    stray = keys.output_key(batch_id, "a-worker-died-before-tidying", 1)
    world.store.put(stray, b"stray")
    with transaction(world.sessions) as session:
        slot = {"slot_at": utcnow(), "kind": "manual", "status": "submitted", "decided_by": "t"}
        session.add(PlanSlot(plan_id=_plan(session), batch_id=batch_id, **slot))
        now = utcnow()
        session.execute(update(Job).where(Job.batch_id == batch_id).values(deleted_at=now, expires_at=now))
        session.execute(update(Batch).where(Batch.id == batch_id).values(deleted_at=now))

    world.sweep(2)

    assert world.keys_under(keys.outputs_prefix(batch_id)) == [] and world.keys_under("refs/") == []
    with world.sessions() as session:
        assert session.get(Batch, batch_id) is None
        slot = session.scalars(select(PlanSlot)).one()
        assert slot.batch_id is None and slot.reason == "its batch was deleted"


def _plan(session: Session) -> str:
    plan = Plan(
        name="nightly",
        schedule="0 3 * * *",
        timezone="UTC",
        manifest="/m.jsonl",
        model_set="m",
        lane="scheduled",
        defaults="{}",
        catch_up="latest",
        overlap="skip",
        source="",
        schedule_from=utcnow(),
    )
    session.add(plan)
    session.flush()
    return plan.id


def test_the_loop_sleeps_until_a_deletion_wakes_it_and_counts_what_it_deleted(world: World) -> None:
    import threading
    import time

    from prometheus_client import CollectorRegistry

    from shared.janitor.loop import run_janitor, wake_janitor
    from shared.janitor.metrics import JanitorMetrics

    world.settings = world.settings.model_copy(update={"janitor_interval_s": 300.0})
    registry = CollectorRegistry()
    metrics = JanitorMetrics(registry)
    stop = threading.Event()
    loop = threading.Thread(
        target=run_janitor,
        kwargs={
            "sessions": world.sessions,
            "store": world.store,
            "redis_client": world.redis,
            "settings": world.settings,
            "stop": stop,
            "observe": metrics.observe,
        },
    )
    loop.start()
    try:
        time.sleep(1.0)  # its first pass found nothing: it sleeps for the interval
        _, jobs = world.batch("b", jobs=2)
        world.expire(jobs)
        assert wake_janitor(redis_client=world.redis, prefix=world.settings.redis_prefix)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and any(getattr(world.job(j), "data_state", None) is None for j in jobs):
            time.sleep(0.1)
    finally:
        stop.set()
        loop.join(timeout=30)
    assert all(getattr(world.job(j), "data_state", None) == DataState.removed.value for j in jobs)
    # The two outputs, then the image no kept job uses any more and its embedding.
    assert registry.get_sample_value("ipab_janitor_objects_deleted_total") == 4
    assert (registry.get_sample_value("ipab_janitor_bytes_deleted_total") or 0) > 2 * len(PNG_BYTES)
    assert registry.get_sample_value("ipab_janitor_jobs_removed_total") == 2
    assert registry.get_sample_value("ipab_janitor_lag_seconds") == 0.0
    assert world.redis.get(world.settings.redis_prefix + keys.JANITOR_LOCK_KEY) is None  # handed over on stop


def test_a_deleted_job_whose_worker_lets_go_is_canceled_not_queued_again(world: World) -> None:
    from shared.jobs import expire_leases, release_job

    _, (lost, released) = world.batch("b", jobs=2, status=JobStatus.queued.value)
    attempts = {
        job_id: claim_job(sessions=world.sessions, job_id=job_id, worker_host="gpu", lease_s=60, max_attempts=3)
        for job_id in (lost, released)
    }
    with transaction(world.sessions) as session:
        now = utcnow()
        session.execute(update(Job).values(deleted_at=now, expires_at=now))
        session.execute(update(Job).where(Job.id == lost).values(lease_expires_at=now - timedelta(minutes=1)))

    requeued, failed = expire_leases(sessions=world.sessions, max_attempts=3)
    outcome = release_job(
        sessions=world.sessions,
        job_id=released,
        attempt=attempts[released] or 0,
        max_attempts=3,
        error_type="StorageUnavailable",
        message="S3 away",
    )

    assert (requeued, failed, outcome) == ([], [], "canceled")
    assert {getattr(world.job(j), "status", None) for j in (lost, released)} == {"canceled"}
    world.sweep()
    assert world.job(lost) is None and world.job(released) is None


def test_a_job_deleted_after_its_objects_expired_goes_and_is_counted_once(world: World) -> None:
    from scheduler.batches.deletion import request_job_deletion

    batch_id, jobs = world.batch("b", jobs=3)
    world.expire(jobs[:2])
    world.sweep()
    expired_at = world.job(jobs[0])
    assert expired_at is not None and expired_at.data_state == DataState.removed.value
    with transaction(world.sessions) as session:
        assert request_job_deletion(session=session, job_id=jobs[0]) == 1
    deleted = world.job(jobs[0])
    assert deleted is not None and deleted.expires_at == expired_at.expires_at  # its real expiry is kept

    (report,) = world.sweep()

    assert world.job(jobs[0]) is None and report.rows_purged == 1
    assert [world.job(j) is not None for j in jobs[1:]] == [True, True]
    with world.sessions() as session:
        batch = session.get(Batch, batch_id)
        assert batch is not None and batch.removed_count == 2  # removed once; its deletion counts nothing more
    assert world.store.exists(keys.ref_key(world.images["a"], "png"))  # the third job still uses the image


def test_a_batch_deleted_after_its_jobs_expired_goes_whole(world: World) -> None:
    from scheduler.batches.deletion import mark_batch_jobs, request_batch_deletion

    batch_id, jobs = world.batch("b", jobs=3)
    world.expire(jobs)
    world.sweep()
    with transaction(world.sessions) as session:
        assert request_batch_deletion(session=session, batch_id=batch_id)
    mark_batch_jobs(sessions=world.sessions, batch_id=batch_id)

    world.sweep(2)

    with world.sessions() as session:
        assert session.get(Batch, batch_id) is None
        assert session.scalar(select(func.count()).select_from(Job).where(Job.batch_id == batch_id)) == 0
    assert world.keys_under(keys.outputs_prefix(batch_id)) == [] and world.keys_under("refs/") == []


def test_a_job_deleted_while_the_janitor_removes_its_objects_goes_with_the_next_step(world: World) -> None:
    from scheduler.batches.deletion import request_job_deletion
    from shared.janitor.outputs import delete_objects, finish_removal, mark_removing

    batch_id, jobs = world.batch("b", jobs=2)
    world.expire(jobs)
    doomed = mark_removing(sessions=world.sessions, limit=10)  # step 1, read before the deletion
    with transaction(world.sessions) as session:
        assert request_job_deletion(session=session, job_id=jobs[0]) == 1
    delete_objects(world.store, doomed)
    finish_removal(sessions=world.sessions, doomed=doomed)

    world.sweep()

    assert world.job(jobs[0]) is None
    kept = world.job(jobs[1])
    assert kept is not None and kept.data_state == DataState.removed.value
    with world.sessions() as session:
        batch = session.get(Batch, batch_id)
        assert batch is not None and batch.removed_count == 2
