"""The distributed dedup pipeline: small steps (pipelines.steps) composed by an executor
(haagenti.executors.LocalExecutor or pipelines.executors.RayExecutor) into the job (pipelines.dedup)."""
