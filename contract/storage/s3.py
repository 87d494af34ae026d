"""Results in any S3-compatible store (AWS, MinIO, moto) through boto3."""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from typing import Any

import boto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

from contract.storage.base import ResultStorage, StorageUnavailable, StoredObject

CHUNK = 256 * 1024


class S3ResultStorage(ResultStorage):
    presigns = True

    def __init__(
        self,
        *,
        bucket: str,
        prefix: str = "",
        endpoint_url: str | None = None,
        public_endpoint_url: str | None = None,
        region: str = "us-east-1",
        access_key_id: str | None = None,
        secret_access_key: str | None = None,
    ) -> None:
        self.bucket = bucket
        self.prefix = prefix
        session = boto3.session.Session(
            aws_access_key_id=access_key_id,
            aws_secret_access_key=secret_access_key,
            region_name=region,
        )
        config = Config(signature_version="s3v4", retries={"max_attempts": 3})
        self.client: Any = session.client("s3", endpoint_url=endpoint_url, config=config)
        # Presigned URLs must name the host clients reach (MinIO behind a proxy, compose
        # service names...), which may differ from the one the worker talks to.
        self.presign_client: Any = (
            session.client("s3", endpoint_url=public_endpoint_url, config=config)
            if public_endpoint_url
            else self.client
        )

    def _full(self, key: str) -> str:
        return f"{self.prefix}{key}"

    def put(
        self, key: str, data: bytes, content_type: str, metadata: dict[str, str]
    ) -> StoredObject:
        try:
            self.client.put_object(
                Bucket=self.bucket,
                Key=self._full(key),
                Body=data,
                ContentType=content_type,
                Metadata=metadata,
            )
        except (BotoCoreError, ClientError) as exc:  # unreachable endpoint, no bucket, denied
            raise StorageUnavailable(f"cannot store {key} in bucket {self.bucket}: {exc}") from exc
        return StoredObject(key=key, bytes=len(data), content_type=content_type)

    def open(self, key: str) -> Iterator[bytes]:
        try:
            body = self.client.get_object(Bucket=self.bucket, Key=self._full(key))["Body"]
        except self.client.exceptions.NoSuchKey as exc:
            raise FileNotFoundError(key) from exc
        return iter(lambda: body.read(CHUNK), b"")

    def metadata(self, key: str) -> dict[str, str]:
        head = self.client.head_object(Bucket=self.bucket, Key=self._full(key))
        return dict(head.get("Metadata", {}))

    def presigned_url(self, key: str, expires_s: int) -> str | None:
        url: str = self.presign_client.generate_presigned_url(
            "get_object",
            Params={"Bucket": self.bucket, "Key": self._full(key)},
            ExpiresIn=expires_s,
        )
        return url

    def delete_older_than(self, cutoff: float) -> int:
        # A bucket lifecycle rule is the production answer; this sweep covers stores without one.
        limit = dt.datetime.fromtimestamp(cutoff, tz=dt.UTC)
        paginator = self.client.get_paginator("list_objects_v2")
        removed = 0
        for page in paginator.paginate(Bucket=self.bucket, Prefix=self.prefix):
            old = [{"Key": o["Key"]} for o in page.get("Contents", []) if o["LastModified"] < limit]
            if old:
                self.client.delete_objects(Bucket=self.bucket, Delete={"Objects": old})
                removed += len(old)
        return removed

    def check(self) -> None:
        self.client.head_bucket(Bucket=self.bucket)
