"""Shapes of the uploads API: the request body here; the file entry and the responses are the shared wire
models (:mod:`modelpress.schemas`), which the client parses into too."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from modelpress.schemas import (
    FileIn,
    FileTarget,
    PartTarget,
    ReceivedFile,
    ReceivedPart,
    UploadOut,
    UploadProgress,
    check_upload_path,
)

__all__ = [
    "FileIn",
    "FileTarget",
    "PartTarget",
    "ReceivedFile",
    "ReceivedPart",
    "UploadCreate",
    "UploadOut",
    "UploadProgress",
    "check_upload_path",
]


class UploadCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    files: list[FileIn] = Field(
        min_length=1, description="unique paths; no path may be both a file and a directory of another"
    )
