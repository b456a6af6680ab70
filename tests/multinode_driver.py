"""A three-node Ray cluster on this machine, driven through the jobs' entrypoints: a head that
runs no step (0 CPUs) and two one-CPU worker nodes, made with ray.cluster_utils.Cluster, each
node a raylet of its own. `jobs.dedup` runs the catalog into the library with one worker node
removed when its first stage ends (the other must finish the run); then `jobs.dedup` again (a
no-op), `jobs.verify`, `jobs.gc` and `jobs.compact`. Catalog, model files and library are
s3:// URLs only. Prints one JSON line of what each step returned.

    python tests/multinode_driver.py CATALOG_URL LIBRARY_URL   (run by tests/test_multinode.py)
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main(catalog: str, library: str) -> dict:
    import ray
    from ray.cluster_utils import Cluster

    from jobs import compact, dedup, gc, verify
    from pipelines.executors import _private_token

    _private_token()  # a cluster of our own token, never ~/.ray/auth_token
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    workers = [cluster.add_node(num_cpus=1) for _ in range(2)]
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, log_to_driver=False)
    out: dict = {"nodes": len([n for n in ray.nodes() if n["Alive"]])}
    stages: list[str] = []

    def remove_a_node(stage: str) -> None:
        stages.append(stage)
        if len(stages) == 1:
            cluster.remove_node(workers[1])  # its step actor dies with it, mid-run

    try:
        argv = ["--catalog", catalog, "--library", library, "--address", cluster.address, "--no-report", "--fragment-size", "65536"]
        for step, run in (("dedup", lambda: dedup.main(argv, progress=remove_a_node)), ("dedup again", lambda: dedup.main(argv)),
                          ("verify", lambda: verify.main(["--library", library])), ("gc", lambda: gc.main(["--library", library])),
                          ("compact", lambda: compact.main(["--library", library]))):
            said = io.StringIO()
            with contextlib.redirect_stdout(said):
                rc = run()
            out[step] = {"rc": rc, "said": said.getvalue()}
        out["nodes after"] = len([n for n in ray.nodes() if n["Alive"]])
        out["stages"] = stages
    finally:
        ray.shutdown()
        cluster.shutdown()
    return out


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1], sys.argv[2])))
