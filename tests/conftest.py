"""Shared fixtures. Kept small: each fixture is named after what it provides."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

FIXTURES = Path(__file__).parent / "fixtures"
REAL_DIR = FIXTURES / "real"  # 4 RSNA radiographs + labels + hand21 key points (see README there)

S3_REGION = "eu-west-1"
S3_BUCKET = "boneage-test"


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def s3_server():
    """A real S3 endpoint on loopback (moto server mode), for the whole session.

    Yields {"endpoint_url", "bucket", "region", "storage_options"}; storage_options is what
    boneage functions take to reach it through s3fs. The bucket starts empty; tests write
    under their own prefix.
    """
    import boto3
    from moto import server as server_mod  # moto[server] is a test extra: missing it fails loudly
    port = _free_port()
    server = server_mod.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    creds = {"aws_access_key_id": "testing", "aws_secret_access_key": "testing"}
    client = boto3.client("s3", endpoint_url=endpoint, region_name=S3_REGION, **creds)
    client.create_bucket(Bucket=S3_BUCKET, CreateBucketConfiguration={"LocationConstraint": S3_REGION})
    storage_options = {
        "key": "testing",
        "secret": "testing",
        "client_kwargs": {"endpoint_url": endpoint, "region_name": S3_REGION},
    }
    try:
        yield {"endpoint_url": endpoint, "bucket": S3_BUCKET, "region": S3_REGION, "storage_options": storage_options}
    finally:
        server.stop()


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray instance for the whole test session (starting Ray costs seconds)."""
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=2, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def synthetic_small(tmp_path_factory):
    """A few small synthetic radiographs with labels and key points, written once per session."""
    from boneage.data import synth

    folder = tmp_path_factory.mktemp("synthetic")
    paths = synth.write_dataset(6, folder, seed=7, size=(512, 384), progress=False)
    return {name: str(path) for name, path in paths.items()}


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory):
    """A real PACS for one test module: Orthanc with its DICOMweb plug-in on loopback, authentication on, its
    own storage (tests/orthanc_server.py): {"url": DICOMweb root, "base": REST root, "auth": (user, password)}."""
    import orthanc_server

    process, server = orthanc_server.start(tmp_path_factory.mktemp("orthanc"))
    try:
        yield server
    finally:
        orthanc_server.stop(process)
