"""The S3 backend end to end: a real worker writes to moto's S3 server over HTTP, and the API
redirects downloads to a presigned URL on the public endpoint."""

from __future__ import annotations

import hashlib
import io
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import boto3
import httpx
import pytest
from moto.server import ThreadedMotoServer
from PIL import Image
from redis import Redis

from contract.storage.s3 import S3ResultStorage
from service.app import create_app
from tests.conftest import free_port
from tests.live_stack import ApiServer, WorkerProcess, wait_status
from tests.service.conftest import make_settings

pytestmark = pytest.mark.integration



@pytest.fixture(scope="module")
def s3_endpoint() -> Iterator[str]:
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    yield f"http://127.0.0.1:{port}"
    server.stop()


def make_bucket(endpoint: str) -> str:
    bucket = f"results-{uuid.uuid4().hex[:8]}"
    client = boto3.client(
        "s3",
        endpoint_url=endpoint,
        region_name="us-east-1",
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
    )
    client.create_bucket(Bucket=bucket)
    return bucket


def test_worker_stores_in_s3_and_api_redirects_to_presigned_url(
    s3_endpoint: str, redis_url: str, tmp_path: Path, tiny_model_dir: Path
) -> None:
    bucket = make_bucket(s3_endpoint)
    public = s3_endpoint.replace("127.0.0.1", "localhost")  # what clients would reach
    settings = make_settings(
        redis_url, f"t{uuid.uuid4().hex[:10]}", tmp_path, tiny_model_dir,
        storage_backend="s3", s3_endpoint_url=s3_endpoint, s3_public_endpoint_url=public,
        s3_bucket=bucket, s3_prefix="gen/", s3_access_key_id="testing",
        s3_secret_access_key="testing",
    )
    redis = Redis.from_url(redis_url)
    worker = WorkerProcess(settings, "s3-worker", tmp_path).start()
    try:
        worker.wait_ready(redis)
        with ApiServer(create_app(settings), free_port()) as api, api.client() as client:
            created = client.post(
                "/v1/generations",
                json={"prompt": "s3", "width": 64, "height": 96, "steps": 3,
                      "output_format": "webp", "seed": 42},
            ).json()
            final = wait_status(client, created["id"], {"succeeded", "failed"}, 120)
            assert final["status"] == "succeeded", final
            [output] = final["outputs"]

            redirect = client.get(output["url"])
            assert redirect.status_code == 307
            location = redirect.headers["location"]
            assert location.startswith(f"{public}/{bucket}/gen/{created['id']}/0.webp")
            assert "X-Amz-Signature" in location

            image_bytes = httpx.get(location, timeout=10).content
            assert hashlib.sha256(image_bytes).hexdigest() == output["sha256"]
            assert Image.open(io.BytesIO(image_bytes)).size == (64, 96)

        storage = S3ResultStorage(bucket=bucket, prefix="gen/", endpoint_url=s3_endpoint,
                                  access_key_id="testing", secret_access_key="testing")
        metadata = storage.metadata(f"{created['id']}/0.webp")
        assert metadata["seed"] == "42" and metadata["sha256"] == output["sha256"]
        assert len(json_list(metadata["stage-seconds"])) == 2
    finally:
        worker.stop()
        redis.close()


def json_list(text: str) -> list:
    import json

    value = json.loads(text)
    assert isinstance(value, list)
    return value


def test_s3_expiry_deletes_old_results(s3_endpoint: str) -> None:
    bucket = make_bucket(s3_endpoint)
    storage = S3ResultStorage(bucket=bucket, prefix="p/", endpoint_url=s3_endpoint,
                              access_key_id="testing", secret_access_key="testing")
    storage.put("a" * 32 + "/0.png", b"old", "image/png", {"seed": "1"})
    assert storage.delete_older_than(time.time() - 3600) == 0
    assert storage.delete_older_than(time.time() + 5) == 1
    with pytest.raises(FileNotFoundError):
        list(storage.open("a" * 32 + "/0.png"))


def test_a_generate_only_key_may_ask_openai_for_urls_when_storage_presigns_them(
    s3_endpoint: str, redis_url: str, tmp_path: Path, tiny_model_dir: Path
) -> None:
    """Presigned links need no API key, so no `read` scope: only this API's own links do."""
    keys_file = tmp_path / "keys.json"
    keys_file.write_text('[{"id": "gen", "token": "gen-token-0123456789", "scopes": ["generate"]}]')
    settings = make_settings(
        redis_url, f"t{uuid.uuid4().hex[:10]}", tmp_path, tiny_model_dir,
        storage_backend="s3", s3_endpoint_url=s3_endpoint, s3_bucket=make_bucket(s3_endpoint),
        s3_access_key_id="testing", s3_secret_access_key="testing",
        auth_mode="keys", api_keys_file=keys_file, openai_wait_s=0.5,
    )
    headers = {"Authorization": "Bearer gen-token-0123456789"}
    with ApiServer(create_app(settings), free_port()) as api, api.client() as client:
        answer = client.post("/v1/images/generations", json={"prompt": "x"}, headers=headers)
    # Accepted and queued (no worker runs here, so the wait ends in its timeout), not a 403.
    assert answer.status_code == 504, answer.text
