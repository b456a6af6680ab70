"""`ray job submit` against a real Ray head started with `ray start --head`."""
import concurrent.futures
import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

import pytest
import yaml

from haagenti.library import FragmentLibrary
from tests.helpers import model_file, sha256

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


README_ADDRESS = "http://127.0.0.1:8265"


def readme_ray_lines() -> list[str]:
    """The command lines of the README's "The Ray job" block, as written."""
    with open(os.path.join(REPO, "README.md")) as f:
        section = f.read().split("## The Ray job", 1)[1]
    block = re.search(r"```bash\n(.*?)```", section, re.S)
    assert block, "README: no ```bash block under '## The Ray job'"
    return [line.split("  #")[0].strip() for line in block.group(1).splitlines() if line.strip()]


def submit(bindir, env, line: str):
    """A `ray job submit` line run by bash in the repository, retried while the head's job agent
    is still starting."""
    deadline = time.monotonic() + 180
    while True:
        p = subprocess.run(["bash", "-c", line], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
        # The job list answers before the head's job agent is up; Ray says to try again.
        if "No available agent to submit job" not in p.stderr or time.monotonic() > deadline:
            return p
        time.sleep(0.5)


def wait_for_jobs_api(address: str) -> None:
    """Until the head's dashboard answers the job list (what `ray job list` asks), polled over
    HTTP: a `ray` command per probe costs seconds of start-up."""
    deadline = time.monotonic() + 120
    while True:
        try:
            with urllib.request.urlopen(f"{address}/api/jobs/", timeout=5) as r:
                if r.status == 200:
                    return
        except OSError as e:
            assert time.monotonic() < deadline, f"head did not come up: {e}"
        time.sleep(0.25)


@pytest.mark.timeout(600)
def test_ray_job_submit_dedup(tmp_path):
    """As a user meets it: the README's "The Ray job" block, `ray start --head` (here with ports
    of its own, beside the suite's cluster) and its `ray job submit` lines as written, with the
    test's address, catalog and library put in, and no RAY_AUTH_MODE anywhere. (That a local
    cluster such as `make demo`'s leaves no token file turning auth on for this head is
    test_pipeline.py's one-CPU test: the same start, init_local_ray, with ~ in a folder.)"""
    bindir = os.path.dirname(sys.executable)
    home = tmp_path / "home"  # the user's ~: where Ray would leave ~/.ray/auth_token
    home.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(PATH=bindir + os.pathsep + os.environ["PATH"], HOME=str(home))
    files = [model_file(tmp_path / f"m{i}.safetensors", seed=i) for i in range(2)]
    cat = tmp_path / "catalog.yaml"
    cat.write_text(yaml.safe_dump({"models": [{"id": f"m{i}", "family": "f", "files": [f]} for i, f in enumerate(files)]}))

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
        lib = tmp_path / "lib"
        address = f"http://127.0.0.1:{dash}"
        wait_for_jobs_api(address)
        lines = readme_ray_lines()
        assert lines[0] == "ray start --head" and lines[-1] == "ray stop"
        jobs = [line.replace(README_ADDRESS, address).replace("$PWD/try/fam/catalog.yaml", str(cat)).replace("$PWD/try/lib4", str(lib))
                for line in lines[1:-1]]
        assert [j.split(" -- ")[1].split()[2] for j in jobs] == ["jobs.dedup", "jobs.verify", "jobs.gc", "jobs.compact"]
        # A relative library would land in the job's temporary copy of --working-dir: refused.
        # That job reads nothing of the others': it runs beside them.
        with concurrent.futures.ThreadPoolExecutor(1) as beside:
            relative = beside.submit(submit, bindir, env, jobs[0].replace(str(lib), "rel_lib"))
            said = []
            for job in jobs:
                p = submit(bindir, env, job)
                assert p.returncode == 0 and "succeeded" in p.stdout, job + "\n" + p.stdout[-3000:] + p.stderr[-3000:]
                said.append(p.stdout)
            p = relative.result()
        assert p.returncode != 0 and "error: --library 'rel_lib' is relative" in p.stdout + p.stderr, p.stdout[-3000:] + p.stderr[-3000:]
        assert "Traceback" not in p.stdout + p.stderr
        assert "added 2" in said[0] and "ok:" in said[1] and "gc: nothing to collect" in said[2] and "compact: " in said[3]
        library = FragmentLibrary.open(str(lib), create=False)
        for i, f in enumerate(files):
            [out] = library.restore(f"m{i}", str(tmp_path / "out" / f"m{i}"))
            assert sha256(out) == sha256(f)
    finally:
        # SIGTERM to `ray start` alone stops its processes in seconds; sent to the whole group,
        # the head outlives it. A straggler (its forkserver) is killed after.
        head.send_signal(signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            head.wait(30)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(head.pid, signal.SIGKILL)
        shutil.rmtree(temp, ignore_errors=True)
