"""Shared fixtures: a trained example family, a real S3 API server on loopback, one Ray cluster."""
from __future__ import annotations

import os
import socket

import pytest

SMALL = {"d": 128, "layers": 2, "epochs": 2}


@pytest.fixture(scope="session")
def family(tmp_path_factory):
    """The example family, trained for real (small settings), with its catalog."""
    from haagenti.examples import make_family, write_catalog

    out = tmp_path_factory.mktemp("family")
    members = make_family(str(out), **SMALL)
    write_catalog(members, str(out))
    return members


@pytest.fixture(scope="session")
def s3_server():
    """moto's S3 API on 127.0.0.1; sets the AWS_* environment that s3fs and delta-rs both read."""
    from moto.server import ThreadedMotoServer

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    env = {
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_REGION": "us-east-1",
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    yield endpoint
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    server.stop()


@pytest.fixture
def bucket(s3_server, request):
    import boto3

    name = "hg-" + request.node.name.lower().replace("_", "-")[:40]
    boto3.client("s3", endpoint_url=s3_server).create_bucket(Bucket=name)
    return name


@pytest.fixture(scope="session")
def ray_cluster():
    """One local Ray cluster for the whole run (2 CPUs: actor pools must stay below that)."""
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()
