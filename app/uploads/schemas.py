"""Public shapes of the uploads API."""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from pydantic import BaseModel, Field


class FileIn(BaseModel):
    path: str = Field(
        min_length=1, max_length=500, description="relative path inside the upload, e.g. 'model.safetensors'"
    )
    size: int = Field(ge=0)
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")


class UploadCreate(BaseModel):
    files: list[FileIn] = Field(min_length=1)


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
