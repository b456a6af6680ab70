"""The pipeline and every job entrypoint on a three-node Ray cluster (tests/multinode_driver.py),
over S3 only, losing a worker node mid-run."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest

from haagenti.library import FragmentLibrary
from pipelines.dedup import run_dedup
from pipelines.executors import LocalExecutor
from tests.test_pipeline import CONFIG, catalog, content

DRIVER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "multinode_driver.py")


@pytest.mark.ray
@pytest.mark.timeout(300)
def test_jobs_on_three_nodes_over_s3_survive_a_lost_node(tmp_path, family, bucket):
    from haagenti.fsio import filesystem_for

    members = family[:4]
    fs, _ = filesystem_for(f"s3://{bucket}")
    remote = {}
    for m in members:  # the model files exist on S3 only: a step that read the driver's disk would fail
        fs.put(m.file, f"{bucket}/models/{os.path.basename(m.file)}")
        remote[m.model_id] = f"s3://{bucket}/models/{os.path.basename(m.file)}"
    fs.put(catalog(tmp_path / "remote.yaml", members, remote), f"{bucket}/catalog.yaml")
    s3_lib = f"s3://{bucket}/lib"
    p = subprocess.Popen([sys.executable, DRIVER, f"s3://{bucket}/catalog.yaml", s3_lib], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True, start_new_session=True)
    try:
        out, err = p.communicate(timeout=240)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)  # the cluster's raylets and workers are in the driver's session
        out, err = p.communicate()
        pytest.fail(f"the three-node run did not finish in 240 s: {err[-3000:]}")
    assert p.returncode == 0, err[-3000:]
    said = json.loads(out.strip().splitlines()[-1])
    assert said["nodes"] == 3 and said["nodes after"] == 2, said  # one worker node was really removed
    assert said["dedup"]["rc"] == 0 and "added 4" in said["dedup"]["said"], said
    assert said["dedup again"]["rc"] == 0 and "nothing to do: all 4 models" in said["dedup again"]["said"], said
    assert all(said[j]["rc"] == 0 for j in ("verify", "gc", "compact")), said
    # The same tables as one process on one node.
    one_node = str(tmp_path / "one-node")
    run_dedup(catalog(tmp_path / "local.yaml", members), one_node, LocalExecutor(), CONFIG)
    a, b = FragmentLibrary.open(s3_lib), FragmentLibrary.open(one_node)
    for table, key in (("fragments", "fragment_id"), ("signatures", "fragment_id")):
        assert content(a, table, key) == content(b, table, key), table
    assert a.verify().ok
