"""Public shapes of the uploads API."""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from app.db import JSON_INT_MAX

# Names the local storage backend gives its own files beside an object: a partial write
# (``<name>.<random>.part``) and a multipart upload's parts (``<name>.parts/00001``).
RESERVED_SUFFIXES = (".part", ".parts")
MAX_COMPONENT_BYTES = 255  # a file name on every common file system (ext4, XFS, APFS, NTFS)
MAX_PATH_BYTES = 900  # S3 keys are at most 1024 bytes; the upload's prefix and a part suffix take the rest


def check_upload_path(path: str) -> str:
    """A path every storage backend can hold as the same object (S3 key, file under a directory), or ValueError.

    Relative, ``/``-separated, each component a plain file name: no NUL or other control characters, no
    backslash (a separator elsewhere), no empty, ``.`` or ``..`` component, no hidden (dot) names, no
    component over 255 bytes, and none of the local backend's reserved suffixes.
    """
    try:
        encoded = path.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError("must be valid UTF-8 (no lone surrogates)") from exc
    if len(encoded) > MAX_PATH_BYTES:
        raise ValueError(f"at most {MAX_PATH_BYTES} bytes in UTF-8")
    if any(ord(char) < 0x20 or ord(char) == 0x7F for char in path):
        raise ValueError("control characters (NUL included) are not allowed")
    if "\\" in path:
        raise ValueError("backslashes are not allowed; separate directories with '/'")
    if path.startswith("/"):
        raise ValueError("must be relative, not absolute")
    for part in path.split("/"):
        if part in ("", ".", ".."):
            raise ValueError("empty, '.' and '..' path components are not allowed")
        if part.startswith("."):
            raise ValueError(f"hidden names are not allowed: {part!r}")
        if len(part.encode("utf-8")) > MAX_COMPONENT_BYTES:
            raise ValueError(f"each path component is at most {MAX_COMPONENT_BYTES} bytes")
        if part.endswith(RESERVED_SUFFIXES):
            raise ValueError(f"names ending in {' or '.join(RESERVED_SUFFIXES)} are reserved")
    return path


class FileIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    path: str = Field(
        min_length=1,
        max_length=500,
        description="relative path inside the upload, e.g. 'model.safetensors': '/'-separated, no '..', no "
        "hidden or empty components, no control characters or backslashes, each component at most 255 bytes",
    )
    size: int = Field(ge=0, le=JSON_INT_MAX, strict=True)  # strict: `false` is no size
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")

    @field_validator("path")
    @classmethod
    def _portable(cls, value: str) -> str:
        return check_upload_path(value)


class UploadCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    files: list[FileIn] = Field(
        min_length=1, description="unique paths; no path may be both a file and a directory of another"
    )


class PartTarget(BaseModel):
    part_number: int
    url: str


class FileTarget(BaseModel):
    path: str
    url: str | None = None
    part_size: int | None = None
    parts: list[PartTarget] | None = None


class UploadOut(BaseModel):
    id: str
    object: Literal["upload"] = "upload"
    status: Literal["pending", "complete", "expired"] = Field(
        description="expired: not completed in time; whatever was PUT has been deleted"
    )
    total_bytes: int
    files: list[FileIn]
    created_at: datetime
    completed_at: datetime | None
    expires_at: datetime
    targets: list[FileTarget] | None = Field(default=None, description="where to PUT each file (on creation only)")


class ReceivedPart(BaseModel):
    part_number: int
    size: int


class ReceivedFile(BaseModel):
    path: str
    size: int = Field(description="declared size")
    received: bool = Field(description="the whole file is in storage (single PUT, or its parts assembled)")
    part_size: int | None = Field(default=None, description="multipart files: size of every part but the last")
    parts: list[ReceivedPart] | None = Field(default=None, description="multipart files: the parts PUT so far")


class UploadProgress(BaseModel):
    """What storage holds of a pending upload, so that a client resumes by PUTting only what is missing."""

    object: Literal["upload_progress"] = "upload_progress"
    upload_id: str
    status: Literal["pending", "complete", "expired"]
    files: list[ReceivedFile]
