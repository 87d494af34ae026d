"""Where result images live: a local directory (default) or any S3 endpoint."""

from contract.storage.base import ResultStorage, StorageUnavailable, StoredObject, object_key
from contract.storage.factory import build_storage

__all__ = ["ResultStorage", "StorageUnavailable", "StoredObject", "build_storage", "object_key"]
