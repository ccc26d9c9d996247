"""`edgepack batch`: many packs (models × targets from a jobs.toml), run locally or on a Ray cluster.

Every job is one real `edgepack pack --json` process; this package only plans, schedules, stores and
summarises. Layout: jobs.py (jobs.toml) → inputs.py (hashes, digest) → run_job.py (one pack) →
local.py / ray_exec.py (executors) → store.py (bundles in --out, resume) → board.py (batch.json/html).
"""
