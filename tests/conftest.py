"""Shared fixtures: an isolated project home, a real HTTP file server, a real S3 (moto).

- `slm_home` (autouse): SLM_HOME and PREFECT_HOME under tmp_path, so no test touches ./.slm
  and every `slm run` gets a fresh Prefect database and MLflow store.
- `http_server`: tests/http_server.FileServer on 127.0.0.1 (Range, faults, request log).
- `s3`: a bucket of its own on a moto S3 server on 127.0.0.1 (one server per session),
  with AWS_ENDPOINT_URL and fake credentials in the environment (subprocesses inherit them).
- `artifact_root`: parametrized "local" / "s3": the same store tests run on a path and on
  an s3:// URL.
- `make_profile`: write a profile YAML under tmp_path and return its path.
"""
from __future__ import annotations

import itertools
import os
import sys
from pathlib import Path

import pytest
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))  # `from http_server import FileServer`

from http_server import FileServer  # noqa: E402

_buckets = itertools.count()


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny matrices: one thread is fastest and immune to other processes on a busy 2-core box."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(autouse=True)
def slm_home(tmp_path, monkeypatch) -> Path:
    home = tmp_path / "slm-home"
    monkeypatch.setenv("SLM_HOME", str(home))
    monkeypatch.setenv("PREFECT_HOME", str(tmp_path / "prefect-home"))
    monkeypatch.setenv("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("PREFECT_API_URL", raising=False)  # always Prefect's ephemeral mode, never a dev server
    return home


@pytest.fixture
def http_server():
    with FileServer() as server:
        yield server


@pytest.fixture(scope="session")
def moto_endpoint():
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


class S3:
    """One test's bucket: `url(prefix)` for profiles, `keys(prefix)` straight from S3."""

    def __init__(self, endpoint: str, bucket: str):
        import boto3

        self.endpoint = endpoint
        self.bucket = bucket
        self.client = boto3.client("s3", endpoint_url=endpoint)
        self.client.create_bucket(Bucket=bucket)

    def url(self, prefix: str) -> str:
        return f"s3://{self.bucket}/{prefix}"

    def keys(self, prefix: str = "") -> list[str]:
        found = []
        for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix):
            found += [item["Key"] for item in page.get("Contents", [])]
        return sorted(found)

    def get(self, key: str) -> bytes:
        return self.client.get_object(Bucket=self.bucket, Key=key)["Body"].read()

    def put(self, key: str, body: bytes) -> None:
        self.client.put_object(Bucket=self.bucket, Key=key, Body=body)


@pytest.fixture
def s3(moto_endpoint, monkeypatch) -> S3:
    monkeypatch.setenv("AWS_ENDPOINT_URL", moto_endpoint)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    import fsspec

    fsspec.filesystem("s3").invalidate_cache()  # listings from an earlier test's bucket
    return S3(moto_endpoint, f"slm-test-{os.getpid()}-{next(_buckets)}")


@pytest.fixture(params=["local", "s3"])
def artifact_root(request, slm_home) -> str:
    """The artifact root as a profile's store.root would say it."""
    if request.param == "local":
        return str(slm_home / "artifacts")
    return request.getfixturevalue("s3").url("artifacts")


@pytest.fixture
def make_profile(tmp_path):
    counter = itertools.count()

    def write(data: dict, name: str | None = None) -> Path:
        path = tmp_path / "profiles" / f"{name or f'p{next(counter)}'}.yaml"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(yaml.safe_dump(data, allow_unicode=True, sort_keys=False), encoding="utf-8")
        return path

    return write

