"""The distributed dedup pipeline: small steps (pipelines.steps) composed by an executor
(pipelines.executors: local or Ray) into the job (pipelines.dedup)."""
