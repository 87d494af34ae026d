"""Pick the storage backend the settings name."""

from __future__ import annotations

from contract.settings import Settings
from contract.storage.base import ResultStorage


def build_storage(settings: Settings) -> ResultStorage:
    if settings.storage_backend == "s3":
        from contract.storage.s3 import S3ResultStorage

        secret = settings.s3_secret_access_key
        return S3ResultStorage(
            bucket=settings.s3_bucket,
            prefix=settings.s3_prefix,
            endpoint_url=settings.s3_endpoint_url,
            public_endpoint_url=settings.s3_public_endpoint_url,
            region=settings.s3_region,
            access_key_id=settings.s3_access_key_id,
            secret_access_key=secret.get_secret_value() if secret else None,
        )
    from contract.storage.local import LocalResultStorage

    return LocalResultStorage(settings.results_dir)
