"""The batch layer: every face (CLI, API) and feature (submission, plans, export, gallery,
webhooks) reads and steers batches and jobs through it, so each concept exists once.

- `lookup`: a batch by name or id (within a tenant when one is given), a job; `NotFound`
  otherwise, which each face translates (the CLI into one line, the API into a 404);
- `counts`: jobs per status of batches in one query, with their summed times;
- `record`: a job's record, built once; the results line is its projection here, and the
  API view, the webhook data, the export columns and the gallery card are projections of it;
- `events`: the outbox of job and batch events, written in the transaction that changes a
  status (or found by the delivery loop's scan for changes made by workers);
- `actions`: cancel (with its outbox rows), retry, pause, resume, and waking the dispatcher.
- `limits`: a tenant's caps, counted under its lock in the transaction that adds to them
  (`lock_tenant`: an advisory lock on PostgreSQL, the write lock on SQLite), so they hold
  under concurrency.
"""
