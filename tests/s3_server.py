"""A real S3-compatible server on loopback (moto_server) with credentials enforced, for tests."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class S3Server:
    endpoint: str
    key_id: str
    secret: str
    bucket: str
    process: subprocess.Popen

    def client(self, key_id: str | None = None, secret: str | None = None):
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint, region_name="us-east-1",
                            aws_access_key_id=key_id or self.key_id, aws_secret_access_key=secret or self.secret)

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()


def start_s3_server(bucket: str = "distill-test") -> S3Server:
    import boto3

    port = free_port()
    moto = shutil.which("moto_server", path=os.path.dirname(sys.executable))
    # The first 5 requests go unauthenticated (set-up below); every later one needs a valid key.
    env = {**os.environ, "INITIAL_NO_AUTH_ACTION_COUNT": "5"}
    proc = subprocess.Popen([moto, "-H", "127.0.0.1", "-p", str(port)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 30
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            break
        except OSError:
            if time.time() > deadline or proc.poll() is not None:
                proc.kill()
                raise RuntimeError("moto_server did not start")
            time.sleep(0.1)
    endpoint = f"http://127.0.0.1:{port}"
    admin = dict(endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id="setup", aws_secret_access_key="setup")
    iam = boto3.client("iam", **admin)
    iam.create_user(UserName="distill-ci")
    key = iam.create_access_key(UserName="distill-ci")["AccessKey"]
    policy = {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}]}
    arn = iam.create_policy(PolicyName="all", PolicyDocument=json.dumps(policy))["Policy"]["Arn"]
    iam.attach_user_policy(UserName="distill-ci", PolicyArn=arn)
    boto3.client("s3", **admin).create_bucket(Bucket=bucket)
    return S3Server(endpoint, key["AccessKeyId"], key["SecretAccessKey"], bucket, proc)
