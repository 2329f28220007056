"""The janitor: the control loop that makes data go when its retention says so.

- `outputs`: a job's objects after its expiry (marked `removing` before any is deleted, then
  `removed`; a janitor killed midway is finished by the next), its row after the metadata's
  retention or its deletion, and deleted batches once they are empty;
- `references`: reference images and their embeddings, shared by content, removed only when
  no tenant holds them and no batch with kept jobs uses them (and the submission's side of
  that protocol, `claim_references`);
- `loop`: one pass in bounded steps, and the loop that runs it under a fleet-wide lock;
- `metrics`: objects and bytes deleted, rows purged, the lag.
"""
