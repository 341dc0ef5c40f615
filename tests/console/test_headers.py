"""The console's Content-Security-Policy lets the browser reach the API and the storage it presigns for, nothing else."""

from __future__ import annotations

from app.config import Settings
from app.console.router import content_security_policy, storage_origins


def test_embedded_mode_allows_only_the_api_origin() -> None:
    csp = content_security_policy(Settings(storage_backend="local"))
    assert "connect-src 'self';" in csp and "img-src 'self' blob: data:;" in csp
    assert "unsafe-inline" not in csp and "frame-ancestors 'none'" in csp


def test_s3_mode_adds_the_public_endpoint_that_presigned_urls_name() -> None:
    settings = Settings(
        storage_backend="s3", s3_endpoint_url="http://minio:9000", s3_public_endpoint_url="http://localhost:9000/"
    )
    assert storage_origins(settings) == ["http://localhost:9000"]
    assert "connect-src 'self' http://localhost:9000;" in content_security_policy(settings)
    aws = Settings(storage_backend="s3", s3_bucket="models", s3_region="eu-west-1")
    assert storage_origins(aws) == ["https://models.s3.eu-west-1.amazonaws.com", "https://s3.eu-west-1.amazonaws.com"]
