"""What tests/ and bench/ share: an S3 API server (moto) on loopback, in its own process; and
the fault injector (haagenti.testing.faults). Nothing in the library imports this package,
except the checkpoint seam when a test asks for fault injection (haagenti.checkpoints)."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request


def start_s3_server(timeout: float = 30) -> tuple[subprocess.Popen, str]:
    """moto_server on a free 127.0.0.1 port: (process, endpoint URL); the caller terminates it.
    Its own process because delta-rs calls hold the GIL, so an in-process (threaded) server
    would never get to answer them."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    exe = os.path.join(os.path.dirname(sys.executable), "moto_server")
    proc = subprocess.Popen([exe, "-H", "127.0.0.1", "-p", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout
    while True:
        try:
            urllib.request.urlopen(endpoint, timeout=1)
            return proc, endpoint
        except OSError:
            if time.monotonic() > deadline or proc.poll() is not None:
                proc.kill()
                raise RuntimeError("moto_server did not start") from None
            time.sleep(0.2)


def s3_environment(endpoint: str) -> dict[str, str]:
    """The AWS_* variables that s3fs, boto3 and delta-rs all read, pointing at `endpoint`."""
    return {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_REGION": "us-east-1", "AWS_DEFAULT_REGION": "us-east-1"}
