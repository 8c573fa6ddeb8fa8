"""A real S3-protocol server on loopback (moto in server mode), for stores named s3://.

`moto_s3()` starts one and stops it by its PID; `S3Server.env` is botocore's
environment for it (what a pod gets), `S3Server.storage_options` the same as s3fs
options, and `new_bucket` a fresh bucket per test.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from recsys_operator.launchers.process import free_port

START_SECONDS = 30


@dataclass(frozen=True)
class S3Server:
    env: dict[str, str]

    @property
    def storage_options(self) -> dict[str, Any]:
        return {
            "key": self.env["AWS_ACCESS_KEY_ID"],
            "secret": self.env["AWS_SECRET_ACCESS_KEY"],
            "endpoint_url": self.env["AWS_ENDPOINT_URL"],
        }

    def new_bucket(self, prefix: str) -> str:
        from fsspec.core import url_to_fs

        bucket = f"{prefix}-{uuid.uuid4().hex[:10]}"
        fs, _ = url_to_fs(f"s3://{bucket}", **self.storage_options)
        fs.mkdir(bucket)
        return bucket


def _accepts(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), 0.2).close()
    except OSError:
        return False
    return True


@contextmanager
def moto_s3() -> Iterator[S3Server]:
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + START_SECONDS
        while not _accepts(port):
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("the moto S3 server did not start listening")
            time.sleep(0.05)
        yield S3Server(
            {
                "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
                "AWS_ACCESS_KEY_ID": "testing",
                "AWS_SECRET_ACCESS_KEY": "testing",
                "AWS_DEFAULT_REGION": "us-east-1",
            }
        )
    finally:
        process.kill()
        process.wait(10)
