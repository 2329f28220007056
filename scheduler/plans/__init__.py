"""Nightly render plans: a manifest submitted on a cron schedule, exactly once per slot.

- `planfile`: reading and validating a plan file (TOML).
- `slots`: cron expressions and time zones; when the slots of a schedule fall (DST rules).
- `store`: the plans and their slot rows in SQL.
- `runner`: one slot into one batch (or a skipped or failed slot row, with the reason).
- `beat`: the `ipab beat` loop, which finds the due slots of every plan.
- `manifests`: a plan's manifest and its references, read at each slot (an API plan's only from S3).
- `views`: what `ipab plans ...` and `/v1/plans` show and do, once for both.
- `defaults`: the defaults that the commands' parsers show, light to import.

The commands `ipab plans ...` and `ipab beat` are in `scheduler.cli.plans`.
"""
