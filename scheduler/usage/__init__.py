"""Usage: reports of what tenants used (from the rollup that job endings keep, `shared.usage`)
and quotas that turn usage into limits.

- `quotas`: per tenant, images and GPU-seconds per UTC day and month, and jobs running at
  once; set, shown, cleared; checked by the submit path under the tenant's lock, in the
  transaction that writes the jobs, so concurrent submissions never pass a limit;
- `report`: usage per day, batch, lane or model set, over a date range, in SQL on the rollup.
"""
