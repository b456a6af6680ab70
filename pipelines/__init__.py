"""The distributed dedup pipeline: the catalog, scan and cut (pipelines.steps), then the ingest's
steps (haagenti.ingest_steps) on an executor (haagenti.executors.LocalExecutor or
pipelines.executors.RayExecutor), composed into the job (pipelines.dedup)."""
