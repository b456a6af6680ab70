"""`ray job submit` against a real Ray head started with `ray start --head`."""
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

import pytest
import yaml

from haagenti.library import FragmentLibrary
from tests.helpers import sha256

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.timeout(420)
def test_ray_job_submit_dedup(tmp_path, family):
    bindir = os.path.dirname(sys.executable)
    # The job's `python` is the one on the PATH of the shell that started the head; token auth
    # (on by default in Ray 2.60 once a token exists) is turned off for this loopback head.
    env = dict(os.environ, PATH=bindir + os.pathsep + os.environ["PATH"], RAY_AUTH_MODE="disabled")
    port, dash = free_port(), free_port()
    # Its own agent ports: another Ray instance on this machine (the suite's session cluster)
    # holds the defaults, and a head whose agent cannot bind never accepts a job.
    agent_ports = [f"--{name}={free_port()}" for name in ("dashboard-agent-listen-port", "dashboard-agent-grpc-port", "metrics-export-port", "runtime-env-agent-port", "ray-client-server-port")]
    temp = tempfile.mkdtemp(prefix="rj", dir="/tmp")  # short: Ray's unix socket paths must fit 107 bytes
    head = subprocess.Popen(
        [os.path.join(bindir, "ray"), "start", "--head", "--block", f"--port={port}", "--num-cpus=2",
         "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}",
         f"--temp-dir={temp}", "--disable-usage-stats", *agent_ports],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    try:
        members = family[:2]
        cat = tmp_path / "catalog.yaml"
        cat.write_text(yaml.safe_dump({"models": [{"id": m.model_id, "family": m.family, "files": [m.file]} for m in members]}))
        lib = tmp_path / "lib"
        address = f"http://127.0.0.1:{dash}"
        deadline = time.monotonic() + 120
        while True:
            probe = subprocess.run([os.path.join(bindir, "ray"), "job", "list", "--address", address], env=env, capture_output=True, text=True)
            if probe.returncode == 0:
                break
            assert time.monotonic() < deadline, f"head did not come up: {probe.stderr[-2000:]}"
            time.sleep(2)
        deadline = time.monotonic() + 180
        while True:
            p = subprocess.run(
                [os.path.join(bindir, "ray"), "job", "submit", "--address", address, "--working-dir", REPO, "--",
                 "python", "-m", "jobs.dedup", "--catalog", str(cat), "--library", str(lib), "--fragment-size", "65536"],
                env=env, capture_output=True, text=True, timeout=300,
            )
            # The job list answers before the head's job agent is up; Ray says to try again.
            if "No available agent to submit job" not in p.stderr or time.monotonic() > deadline:
                break
            time.sleep(2)
        assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
        assert "succeeded" in p.stdout and "added 2" in p.stdout
        library = FragmentLibrary.open(str(lib), create=False)
        for m in members:
            [out] = library.restore(m.model_id, str(tmp_path / "out" / m.model_id))
            assert sha256(out) == sha256(m.file)
    finally:
        os.killpg(head.pid, signal.SIGTERM)
        try:
            head.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
        shutil.rmtree(temp, ignore_errors=True)
