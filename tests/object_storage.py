"""Real storage servers for the tests, on 127.0.0.1 (or an address given): moto's standalone S3
server with authentication on, and Python's own static HTTP server."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager
from dataclasses import dataclass

# moto serves this many requests unauthenticated: the three that create the test user and its key.
_SETUP_REQUESTS = 3
_ALLOW_ALL = json.dumps({"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}]})


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as probe:
        probe.bind((host, 0))
        return probe.getsockname()[1]


def _wait_until_serving(url: str, process: subprocess.Popen, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            urllib.request.urlopen(url, timeout=2).close()
            return
        except urllib.error.HTTPError:
            return  # it answers
        except OSError:
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"server for {url} did not start (exit code {process.poll()})") from None
            time.sleep(0.1)


@dataclass(frozen=True)
class S3Server:
    endpoint: str
    access_key: str
    secret_key: str

    def environment(self) -> dict[str, str]:
        """The standard AWS variables a client (and vitrail) takes its endpoint and credentials from."""
        return {"AWS_ENDPOINT_URL": self.endpoint, "AWS_ACCESS_KEY_ID": self.access_key,
                "AWS_SECRET_ACCESS_KEY": self.secret_key, "AWS_REGION": "us-east-1"}

    def client(self):
        import boto3
        return boto3.client("s3", endpoint_url=self.endpoint, region_name="us-east-1",
                            aws_access_key_id=self.access_key, aws_secret_access_key=self.secret_key)

    def keys(self, bucket: str, prefix: str = "") -> list[str]:
        """The objects under `prefix`, without the empty "folder/" markers pyarrow leaves."""
        pages = self.client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
        return sorted(item["Key"] for page in pages for item in page.get("Contents", []) if not item["Key"].endswith("/"))


@contextmanager
def s3_server(host: str = "127.0.0.1", command_prefix: tuple = ()):
    """moto's S3 server with authentication on: only the test user's key is accepted."""
    port = free_port(host)
    process = subprocess.Popen([*command_prefix, sys.executable, "-m", "moto.server", "-H", host, "-p", str(port)],
                               env={"INITIAL_NO_AUTH_ACTION_COUNT": str(_SETUP_REQUESTS), "PATH": "/usr/bin:/bin"},
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    endpoint = f"http://{host}:{port}"
    try:
        _wait_until_serving(f"{endpoint}/moto-api/", process)
        import boto3
        iam = boto3.client("iam", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id="setup",
                           aws_secret_access_key="setup")
        iam.create_user(UserName="vitrail")
        iam.put_user_policy(UserName="vitrail", PolicyName="all", PolicyDocument=_ALLOW_ALL)
        key = iam.create_access_key(UserName="vitrail")["AccessKey"]
        yield S3Server(endpoint, key["AccessKeyId"], key["SecretAccessKey"])
    finally:
        process.terminate()
        process.wait(timeout=30)


@contextmanager
def http_server(folder, host: str = "127.0.0.1"):
    """`python -m http.server` serving `folder` read-only; yields its base URL."""
    port = free_port(host)
    process = subprocess.Popen([sys.executable, "-m", "http.server", str(port), "--bind", host, "--directory", str(folder)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait_until_serving(f"http://{host}:{port}/", process)
        yield f"http://{host}:{port}"
    finally:
        process.terminate()
        process.wait(timeout=30)
