"""URL safety for outbound calls: which addresses are refused, and that connections go to the vetted address."""

from __future__ import annotations

import datetime as dt
import ssl
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from app.config import Settings
from app.netsafety import UnsafeURLError, check_address, check_url, pinned_request


def _settings(**overrides: object) -> Settings:
    # Explicit values, so MODELPRESS_ variables of the environment cannot loosen the rules under test.
    return Settings.model_validate({"allow_http_urls": False, "url_allowlist": [], **overrides})


def _resolver(table: dict[str, list[str]]):  # type: ignore[no-untyped-def]
    def resolve(host: str, _port: int) -> list[str]:
        if host in table:
            return table[host]
        raise OSError("no such host")

    return resolve


@pytest.mark.parametrize(
    "address",
    [
        "127.0.0.1",
        "127.9.9.9",
        "10.0.0.1",
        "10.255.1.2",
        "172.16.0.1",
        "192.168.1.1",
        "169.254.169.254",
        "100.64.0.1",
        "100.127.255.254",
        "0.0.0.0",
        "224.0.0.1",
        "239.255.255.250",
        "240.0.0.1",
        "255.255.255.255",
        "192.0.2.1",  # documentation
        "::1",
        "::",
        "fe80::1",
        "fec0::1",
        "fc00::1",
        "ff02::1",
        "::ffff:127.0.0.1",
        "::ffff:10.0.0.1",
        "::ffff:169.254.169.254",
        "::127.0.0.1",
        "::ffff:8.8.8.8",  # mapped forms are refused even around a public address
        "2002:7f00:1::1",  # 6to4 of 127.0.0.1
        "64:ff9b::a9fe:a9fe",  # NAT64 of 169.254.169.254
    ],
)
def test_private_and_special_addresses_are_refused(address: str) -> None:
    with pytest.raises(UnsafeURLError):
        check_address(address)


@pytest.mark.parametrize("address", ["93.184.216.34", "8.8.8.8", "2606:4700:4700::1111"])
def test_public_addresses_pass(address: str) -> None:
    check_address(address)


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("https://127.0.0.1/hook", "loopback"),
        ("https://10.0.0.5/hook", "private"),
        ("https://169.254.169.254/latest/meta-data", "link-local"),
        ("https://[::ffff:127.0.0.1]/hook", "IPv6 form of 127.0.0.1"),
        ("https://100.64.1.1/hook", "carrier-grade NAT"),
        ("https://localhost/hook", "loopback"),
        ("https://rebind.example/hook", "loopback"),  # one public and one loopback record: refused
        ("http://public.example/hook", "https"),
        ("ftp://public.example/x", "https://"),
        ("https://user:pw@public.example/hook", "credentials"),
        ("https://nowhere.example/hook", "does not resolve"),
        ("https:///nohost", "no host"),
    ],
)
def test_unsafe_urls_are_refused_with_a_reason(url: str, message: str) -> None:
    resolver = _resolver(
        {
            "localhost": ["127.0.0.1", "::1"],
            "rebind.example": ["93.184.216.34", "127.0.0.1"],
            "public.example": ["93.184.216.34"],
            "127.0.0.1": ["127.0.0.1"],
            "10.0.0.5": ["10.0.0.5"],
            "169.254.169.254": ["169.254.169.254"],
            "::ffff:127.0.0.1": ["::ffff:127.0.0.1"],
            "100.64.1.1": ["100.64.1.1"],
        }
    )
    with pytest.raises(UnsafeURLError, match=message):
        check_url(url, _settings(), resolver)


def test_localhost_resolves_to_loopback_with_the_system_resolver() -> None:
    with pytest.raises(UnsafeURLError, match="loopback"):
        check_url("https://localhost:8443/hook", _settings())


def test_public_url_passes_and_keeps_its_addresses() -> None:
    vetted = check_url("https://hooks.example:8443/x?y=1", _settings(), _resolver({"hooks.example": ["93.184.216.34"]}))
    assert (vetted.host, vetted.port, vetted.addresses) == ("hooks.example", 8443, ("93.184.216.34",))


def test_allowlist_and_allow_http() -> None:
    settings = _settings(allow_http_urls=True, url_allowlist=["127.0.0.1", "receiver.internal"])
    check_url("http://127.0.0.1:9000/hook", settings, _resolver({"127.0.0.1": ["127.0.0.1"]}))
    check_url("https://receiver.internal/hook", settings, _resolver({"receiver.internal": ["10.1.2.3"]}))
    with pytest.raises(UnsafeURLError):  # the allow-list names hosts, not whole ranges
        check_url("http://127.0.0.2/hook", settings, _resolver({"127.0.0.2": ["127.0.0.2"]}))


class _EchoHost(BaseHTTPRequestHandler):
    def do_POST(self) -> None:
        body = self.headers.get("Host", "").encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *_args: object) -> None:
        pass


@pytest.fixture
def echo_server() -> Iterator[int]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _EchoHost)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield int(server.server_address[1])
    server.shutdown()
    server.server_close()


def test_pinned_request_connects_to_the_vetted_address_with_the_original_host(echo_server: int) -> None:
    """The name never reaches a resolver again: the connection goes to the checked IP, Host stays the name."""
    settings = _settings(allow_http_urls=True, url_allowlist=["hooks.test"])
    vetted = check_url(f"http://hooks.test:{echo_server}/in", settings, _resolver({"hooks.test": ["127.0.0.1"]}))
    with httpx.Client(trust_env=False) as client:
        response = pinned_request(client, vetted, "POST", headers={}, content=b"{}", timeout=httpx.Timeout(5.0))
        response.read()
        response.close()
    assert response.status_code == 200
    assert response.text == f"hooks.test:{echo_server}"


def _certificate_for(name: str, folder: Path) -> tuple[Path, Path, Path]:
    """A throwaway CA and a server certificate valid for ``name`` only: (ca, cert, key) PEM files."""
    now = dt.datetime.now(dt.UTC)
    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "test ca")])
    ca = (
        x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
        .serial_number(1).not_valid_before(now - dt.timedelta(days=1)).not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )  # fmt: skip
    cert = (
        x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .issuer_name(ca_name).public_key(key.public_key()).serial_number(2)
        .not_valid_before(now - dt.timedelta(days=1)).not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )  # fmt: skip
    paths = folder / "ca.pem", folder / "cert.pem", folder / "key.pem"
    paths[0].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths[1].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    paths[2].write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return paths


def test_a_connection_verified_for_one_name_never_carries_another_names_request(tmp_path: Path) -> None:
    """Two names at one address (a shared IP, SNI-routed): after a request to a.test, whose
    certificate the server holds, a request to b.test on the same client must still fail its own
    certificate check instead of riding the pooled a.test connection."""
    ca, cert, key = _certificate_for("a.test", tmp_path)
    hosts: list[str] = []

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive unless the request says otherwise

        def do_POST(self) -> None:
            self.rfile.read(int(self.headers["content-length"]))
            hosts.append(self.headers["host"])
            self.send_response(200)
            self.send_header("content-length", "0")
            self.end_headers()

        def log_message(self, *_args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    port = server.server_address[1]
    settings = _settings(url_allowlist=["a.test", "b.test"])
    resolver = _resolver({"a.test": ["127.0.0.1"], "b.test": ["127.0.0.1"]})
    timeout = httpx.Timeout(5.0)
    try:
        with httpx.Client(verify=str(ca), follow_redirects=False, trust_env=False) as client:
            first = pinned_request(
                client, check_url(f"https://a.test:{port}/hook", settings, resolver), "POST",
                headers={}, content=b"{}", timeout=timeout,
            )  # fmt: skip
            first.read()
            first.close()
            assert first.status_code == 200
            with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
                pinned_request(
                    client, check_url(f"https://b.test:{port}/hook", settings, resolver), "POST",
                    headers={}, content=b"{}", timeout=timeout,
                )  # fmt: skip
    finally:
        server.shutdown()
        server.server_close()
    assert hosts == [f"a.test:{port}"]


def test_the_services_own_bucket_cannot_be_a_source_bucket() -> None:
    """Every tenant's uploads and artifacts live there: as an s3:// source any tenant could read them."""
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="own bucket"):
        Settings(storage_backend="s3", s3_bucket="modelpress", allowed_source_buckets=["models", "modelpress"])
    assert Settings(storage_backend="s3", s3_bucket="modelpress", allowed_source_buckets=["models"])
