"""ModelPress Python client: from a model folder to a compressed, verified model in a few calls.

```python
from modelpress import ModelPress

mp = ModelPress()  # MODELPRESS_API_KEY, MODELPRESS_BASE_URL
job = mp.jobs.create(model="./my-model", steps=[{"method": "quantize", "scheme": "w8a16"}])
job.wait(progress=True)
job.download("./out")
```

Importing this package loads httpx, pydantic and tqdm only: no torch, FastAPI, SQLAlchemy or Celery.
"""

from modelpress._async import AsyncModelPress
from modelpress._client import InputLike, Job, Jobs, ModelPress, Page, StepLike, Uploads
from modelpress._errors import (
    APIConnectionError,
    APIError,
    AuthenticationError,
    BadRequestError,
    ConflictError,
    ContentTooLargeError,
    FieldError,
    IntegrityError,
    InternalServerError,
    JobFailedError,
    ModelPressError,
    NotFoundError,
    PermissionDeniedError,
    Problem,
    RateLimitError,
    UnprocessableEntityError,
    UploadError,
)
from modelpress.schemas import (
    ApiKey,
    ApiKeyCreated,
    Artifact,
    ArtifactList,
    Event,
    Limits,
    Tenant,
    Upload,
    UploadProgress,
    WebhookDelivery,
    WebhookEndpoint,
    WebhookEndpointWithSecret,
)

__all__ = [
    "APIConnectionError",
    "APIError",
    "ApiKey",
    "ApiKeyCreated",
    "Artifact",
    "ArtifactList",
    "AsyncModelPress",
    "AuthenticationError",
    "BadRequestError",
    "ConflictError",
    "ContentTooLargeError",
    "Event",
    "FieldError",
    "InputLike",
    "IntegrityError",
    "InternalServerError",
    "Job",
    "JobFailedError",
    "Jobs",
    "Limits",
    "ModelPress",
    "ModelPressError",
    "NotFoundError",
    "Page",
    "PermissionDeniedError",
    "Problem",
    "RateLimitError",
    "StepLike",
    "Tenant",
    "UnprocessableEntityError",
    "Upload",
    "UploadError",
    "UploadProgress",
    "Uploads",
    "WebhookDelivery",
    "WebhookEndpoint",
    "WebhookEndpointWithSecret",
]
