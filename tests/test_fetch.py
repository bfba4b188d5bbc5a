"""fetch_url refuses non-public addresses by default: at connect time, on every redirect hop.

No test here can send a packet off this machine, even with the address check broken: the
autouse ``loopback_only`` fixture fails any connect to a non-loopback address, names resolve
from a table (no DNS query leaves), and the off-machine refusals run once more inside an empty
network namespace. Servers are http.server instances on 127.0.0.1 started here.
"""

from __future__ import annotations

import ipaddress
import os
import shutil
import socket
import socketserver
import ssl
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from blipserve.errors import InvalidImage
from blipserve.processing import fetch
from blipserve.processing.fetch import UrlPolicy, check_address, fetch_url
from blipserve.processing.images import load_image

BODY = b"image bytes"  # fetch_url returns bytes; decoding is tested in test_images.py
HINT = "(pass --allow-private-urls or allow the host to fetch from it)"
FAKE_PUBLIC = "93.184.216.34"  # a public address the tests pretend a name resolves to
LOCAL = UrlPolicy(allow_private=True)
PROXY_VARIABLES = ("http_proxy", "https_proxy", "all_proxy", "no_proxy")


# --- guards: loopback connects only, names from a table, no proxies from the environment ------


@pytest.fixture(autouse=True)
def loopback_only(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[Any]]:
    """Fail the test on any connect to an address that is not loopback (127/8, ::1)."""
    blocked: list[Any] = []
    real_connect, real_connect_ex = socket.socket.connect, socket.socket.connect_ex

    def check(address: Any) -> None:
        host = address[0] if isinstance(address, tuple) else str(address)
        try:
            loopback = ipaddress.ip_address(host).is_loopback
        except ValueError:
            loopback = False
        if not loopback:
            blocked.append(address)
            pytest.fail(f"test tried to connect to {address!r}", pytrace=False)

    def connect(sock: socket.socket, address: Any) -> None:
        check(address)
        real_connect(sock, address)

    def connect_ex(sock: socket.socket, address: Any) -> int:
        check(address)
        return real_connect_ex(sock, address)

    monkeypatch.setattr(socket.socket, "connect", connect)
    monkeypatch.setattr(socket.socket, "connect_ex", connect_ex)
    yield blocked
    assert not blocked, f"connects to non-loopback addresses were attempted: {blocked}"


@pytest.fixture(autouse=True)
def dns(monkeypatch: pytest.MonkeyPatch) -> dict[str, list[str]]:
    """host name -> addresses; other names fail to resolve, IP literals resolve to themselves."""
    table = {"localhost": ["127.0.0.1", "::1"]}
    real_getaddrinfo = socket.getaddrinfo

    def getaddrinfo(host: str, port: int, family: int = 0, type: int = 0, *args: Any) -> list:
        if host in table:
            return [answer(ip, port) for ip in table[host]]
        return real_getaddrinfo(host, port, family, type, 0, socket.AI_NUMERICHOST)

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    return table


def answer(ip: str, port: int) -> tuple:
    """One getaddrinfo result for a TCP connection to ip:port."""
    if ipaddress.ip_address(ip).version == 6:
        return (socket.AF_INET6, socket.SOCK_STREAM, 6, "", (ip, port, 0, 0))
    return (socket.AF_INET, socket.SOCK_STREAM, 6, "", (ip, port))


@pytest.fixture(autouse=True)
def no_proxy_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in PROXY_VARIABLES:
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.upper(), raising=False)


# --- a tiny local HTTP server -----------------------------------------------------------------


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.0"
    server: LocalServer

    def log_message(self, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        self.server.requests.append(self.path)
        if self.path == "/to-loopback":
            self.send_response(302)
            self.send_header("Location", f"http://127.0.0.1:{self.server.port}/cat.png")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        self.send_response(200)
        self.send_header("Content-Length", str(len(self.server.body)))
        self.end_headers()
        self.wfile.write(self.server.body)


class LocalServer(ThreadingHTTPServer):
    """Serves ``body`` on 127.0.0.1 and records the paths asked for."""

    daemon_threads = True

    def __init__(self, body: bytes) -> None:
        self.body = body
        self.requests: list[str] = []
        super().__init__(("127.0.0.1", 0), Handler)
        self.port = self.server_address[1]

    def server_bind(self) -> None:  # HTTPServer's looks up our host name; nothing to look up
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = "127.0.0.1", self.server_address[1]


@contextmanager
def serve(body: bytes = BODY, tls: ssl.SSLContext | None = None) -> Iterator[LocalServer]:
    httpd = LocalServer(body)
    if tls is not None:
        httpd.socket = tls.wrap_socket(httpd.socket, server_side=True)
    thread = threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield httpd
    finally:
        httpd.shutdown()
        httpd.server_close()


@pytest.fixture
def server() -> Iterator[LocalServer]:
    with serve() as httpd:
        yield httpd


def refusal(url: str, policy: UrlPolicy = fetch.DEFAULT_URL_POLICY) -> str:
    with pytest.raises(InvalidImage) as info:
        fetch_url(url, policy=policy)
    return str(info.value)


# --- check_address ----------------------------------------------------------------------------

REFUSED = [
    ("127.0.0.1", "127.0.0.1 is a loopback address"),
    ("127.255.0.9", "127.255.0.9 is a loopback address"),
    ("10.1.2.3", "10.1.2.3 is a private address"),
    ("172.16.0.1", "172.16.0.1 is a private address"),
    ("192.168.1.1", "192.168.1.1 is a private address"),
    ("169.254.169.254", "169.254.169.254 is the cloud metadata address"),
    ("169.254.1.1", "169.254.1.1 is a link-local address"),
    ("100.64.0.1", "100.64.0.1 is in the shared address space 100.64.0.0/10"),
    ("0.0.0.0", "0.0.0.0 is the unspecified address"),
    ("224.0.0.1", "224.0.0.1 is a multicast address"),
    ("240.0.0.1", "240.0.0.1 is a reserved address"),
    ("192.0.2.1", "192.0.2.1 is a special-purpose address that is not globally routable"),
    ("::1", "::1 is a loopback address"),
    ("::", ":: is the unspecified address"),
    ("::ffff:127.0.0.1", "is an IPv4-mapped address of 127.0.0.1, a loopback address"),
    ("::ffff:169.254.169.254", "IPv4-mapped address of 169.254.169.254, the cloud metadata"),
    ("::ffff:10.0.0.1", "IPv4-mapped address of 10.0.0.1, a private address"),
    ("64:ff9b::7f00:1", "is a NAT64 address of 127.0.0.1, a loopback address"),
    ("2002:a00:1::", "is a 6to4 address of 10.0.0.1, a private address"),
    ("fe80::1", "fe80::1 is a link-local address"),
    ("fc00::1", "fc00::1 is a unique-local (private) address"),
    ("fd12:3456::1", "fd12:3456::1 is a unique-local (private) address"),
    ("fd00:ec2::254", "fd00:ec2::254 is the cloud metadata address"),
    ("fec0::1", "fec0::1 is a site-local address"),
    ("ff02::1", "ff02::1 is a multicast address"),
    ("::7f00:1", "::7f00:1 is a reserved address"),  # IPv4-compatible (deprecated)
    ("2001:db8::1", "2001:db8::1 is a special-purpose address that is not globally routable"),
]

PUBLIC = [
    "8.8.8.8",
    "1.1.1.1",
    FAKE_PUBLIC,
    "2606:4700::1111",
    "2001:4860:4860::8888",
    "::ffff:8.8.8.8",
    "64:ff9b::808:808",  # NAT64 of 8.8.8.8
    "2002:808:808::1",  # 6to4 of 8.8.8.8
    "2606:4700::6440:1",  # low 32 bits read as IPv4 would be 100.64.0.1: must not matter
]


@pytest.mark.parametrize(("address", "fragment"), REFUSED)
def test_non_public_addresses_are_refused(address: str, fragment: str) -> None:
    with pytest.raises(InvalidImage) as info:
        check_address(ipaddress.ip_address(address))
    message = str(info.value)
    assert fragment in message
    assert message.endswith(HINT)


@pytest.mark.parametrize("address", PUBLIC)
def test_public_addresses_are_allowed(address: str) -> None:
    check_address(ipaddress.ip_address(address))


def test_allow_private_allows_every_address() -> None:
    for address, _ in REFUSED:
        check_address(ipaddress.ip_address(address), LOCAL)


def test_allowed_networks_and_literals() -> None:
    policy = UrlPolicy(allowed_hosts=frozenset({"10.0.0.0/8", "127.0.0.1", "[::1]", "fc00::/7"}))
    for address in ("10.1.2.3", "127.0.0.1", "::ffff:127.0.0.1", "::1", "fd12::1"):
        check_address(ipaddress.ip_address(address), policy)
    for address in ("127.0.0.2", "192.168.1.1", "169.254.169.254", "fe80::1"):
        with pytest.raises(InvalidImage):
            check_address(ipaddress.ip_address(address), policy)


def test_allowed_names_do_not_allow_addresses() -> None:
    policy = UrlPolicy(allowed_hosts=frozenset({"Intranet.Example.Test."}))
    assert policy.allows_name("intranet.example.test")
    assert policy.allows_name("INTRANET.example.test.")
    assert not policy.allows_name("other.example.test")
    with pytest.raises(InvalidImage):
        check_address(ipaddress.ip_address("10.1.2.3"), policy)


def test_policy_takes_any_set_and_rejects_nonsense() -> None:
    from_set = UrlPolicy(allowed_hosts={"a.test"})  # type: ignore[arg-type]
    assert from_set == UrlPolicy(allowed_hosts=frozenset({"a.test"}))
    assert isinstance(from_set.allowed_hosts, frozenset)
    with pytest.raises(ValueError, match=r"10\.0\.0\.0/33"):
        UrlPolicy(allowed_hosts=frozenset({"10.0.0.0/33"}))
    with pytest.raises(ValueError, match="not a host name"):
        UrlPolicy(allowed_hosts=frozenset({" "}))


# --- refusals through fetch_url ---------------------------------------------------------------


def test_refusal_message_names_url_address_and_fix(server: LocalServer) -> None:
    url = f"http://127.0.0.1:{server.port}/a.png?token=secret"
    assert refusal(url) == (
        f"URL http://127.0.0.1:{server.port}/a.png refused: 127.0.0.1 is a loopback address "
        "(pass --allow-private-urls or allow the host to fetch from it)"
    )
    assert server.requests == []


@pytest.mark.parametrize(
    ("url", "fragment"),
    [
        ("http://127.0.0.1:{port}/cat.png", "127.0.0.1 is a loopback address"),
        ("http://localhost:{port}/cat.png", "127.0.0.1 is a loopback address"),
        ("http://[::1]:{port}/cat.png", "::1 is a loopback address"),
        ("http://[::ffff:127.0.0.1]:{port}/cat.png", "IPv4-mapped address of 127.0.0.1"),
        ("http://2130706433:{port}/cat.png", "127.0.0.1 is a loopback address"),
        ("http://0x7f.1:{port}/cat.png", "127.0.0.1 is a loopback address"),
        ("https://127.0.0.1:{port}/cat.png", "127.0.0.1 is a loopback address"),
        ("http://images.example.test:{port}/cat.png", "127.0.0.1 is a loopback address"),
        ("http://10.0.0.1/cat.png", "10.0.0.1 is a private address"),
        ("http://169.254.169.254/latest/meta-data/", "the cloud metadata address"),
        ("http://[fd00:ec2::254]/latest/meta-data/", "the cloud metadata address"),
    ],
)
def test_fetch_refuses_non_public_hosts(
    server: LocalServer, dns: dict[str, list[str]], url: str, fragment: str
) -> None:
    dns["images.example.test"] = ["127.0.0.1"]
    message = refusal(url.format(port=server.port))
    assert " refused: " in message
    assert fragment in message
    assert server.requests == []  # the live server on 127.0.0.1 was never asked


def test_every_resolved_address_is_checked(server: LocalServer, dns: dict[str, list[str]]) -> None:
    dns["mixed.example.test"] = ["127.0.0.1", "10.0.0.1"]
    policy = UrlPolicy(allowed_hosts=frozenset({"127.0.0.1"}))
    message = refusal(f"http://mixed.example.test:{server.port}/cat.png", policy)
    assert "10.0.0.1 is a private address" in message
    assert server.requests == []


def test_load_image_refuses_by_default(server: LocalServer) -> None:
    with pytest.raises(InvalidImage) as info:
        load_image(f"http://127.0.0.1:{server.port}/cat.png", row=4)
    assert str(info.value).startswith(f"row 4: URL http://127.0.0.1:{server.port}/cat.png refused")


@pytest.fixture
def public_name(
    server: LocalServer, dns: dict[str, list[str]], monkeypatch: pytest.MonkeyPatch
) -> list[str]:
    """public.example.test resolves to FAKE_PUBLIC, and connecting there reaches ``server``.

    Returns the addresses _open_socket was asked for; only FAKE_PUBLIC may be among them.
    """
    dns["public.example.test"] = [FAKE_PUBLIC]
    asked: list[str] = []
    real_open_socket = fetch._open_socket

    def open_socket(family: int, sockaddr: tuple, timeout: float | None) -> socket.socket:
        asked.append(sockaddr[0])
        assert sockaddr[0] == FAKE_PUBLIC, f"connect to {sockaddr!r} was not refused"
        return real_open_socket(socket.AF_INET, ("127.0.0.1", server.port), timeout)

    monkeypatch.setattr(fetch, "_open_socket", open_socket)
    return asked


def test_public_host_is_fetched(server: LocalServer, public_name: list[str]) -> None:
    assert fetch_url("http://public.example.test/cat.png") == BODY
    assert public_name == [FAKE_PUBLIC]


def test_redirect_to_loopback_is_refused(server: LocalServer, public_name: list[str]) -> None:
    message = refusal("http://public.example.test/to-loopback")
    assert message.startswith(
        f"URL http://127.0.0.1:{server.port}/cat.png refused: 127.0.0.1 is a loopback address"
    )
    assert server.requests == ["/to-loopback"]  # the first hop was fetched, the second refused
    assert public_name == [FAKE_PUBLIC]


def test_resolved_once_and_connected_to_the_checked_address(
    server: LocalServer, public_name: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # DNS rebinding: the first answer is public, any later one loopback. The address that
    # was checked is the one connected to, so a second lookup could not change anything.
    answers = iter([[answer(FAKE_PUBLIC, 80)]])

    def rebinding_getaddrinfo(host: str, port: int, *args: Any, **kwargs: Any) -> list:
        assert host == "public.example.test"
        return next(answers, [answer("127.0.0.1", port)])

    monkeypatch.setattr(socket, "getaddrinfo", rebinding_getaddrinfo)
    assert fetch_url("http://public.example.test/cat.png") == BODY
    assert public_name == [FAKE_PUBLIC]


# --- allow-listing ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("host", "policy"),
    [
        ("127.0.0.1", LOCAL),
        ("127.0.0.1", UrlPolicy(allowed_hosts=frozenset({"127.0.0.1"}))),
        ("127.0.0.1", UrlPolicy(allowed_hosts=frozenset({"127.0.0.0/8"}))),
        ("localhost", UrlPolicy(allowed_hosts=frozenset({"localhost"}))),
        ("images.example.test", UrlPolicy(allowed_hosts=frozenset({"images.example.test"}))),
    ],
)
def test_allowed_private_hosts_are_fetched(
    server: LocalServer, dns: dict[str, list[str]], host: str, policy: UrlPolicy
) -> None:
    dns["images.example.test"] = ["127.0.0.1"]
    assert fetch_url(f"http://{host}:{server.port}/cat.png", policy=policy) == BODY
    assert server.requests == ["/cat.png"]


# --- proxies ----------------------------------------------------------------------------------


def set_proxy(monkeypatch: pytest.MonkeyPatch, proxy: LocalServer) -> None:
    for name in ("http_proxy", "https_proxy", "all_proxy"):
        monkeypatch.setenv(name.upper(), f"http://127.0.0.1:{proxy.port}")
        monkeypatch.setenv(name, f"http://127.0.0.1:{proxy.port}")


def test_proxy_environment_is_ignored(server: LocalServer, monkeypatch: pytest.MonkeyPatch) -> None:
    with serve(b"from the proxy") as proxy:
        set_proxy(monkeypatch, proxy)
        assert fetch_url(f"http://127.0.0.1:{server.port}/cat.png", policy=LOCAL) == BODY
        assert "10.0.0.1 is a private address" in refusal("http://10.0.0.1/cat.png")
        assert proxy.requests == []


# --- TLS: the check does not weaken certificate or host name verification --------------------


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A self-signed certificate for DNS:localhost and its key."""
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed")
    folder = tmp_path_factory.mktemp("tls")
    cert, key = folder / "cert.pem", folder / "key.pem"
    subject = ["-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost"]
    key_type = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    files = ["-keyout", str(key), "-out", str(cert)]
    subprocess.run(
        ["openssl", "req", "-x509", *key_type, "-days", "1", *subject, *files],
        check=True,
        capture_output=True,
    )
    return cert, key


@pytest.fixture
def tls_server(certificate: tuple[Path, Path]) -> Iterator[LocalServer]:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(*certificate)
    with serve(tls=context) as httpd:
        yield httpd


def trust(monkeypatch: pytest.MonkeyPatch, cert: Path) -> None:
    context = ssl.create_default_context(cafile=str(cert))
    monkeypatch.setattr(fetch, "_ssl_context", lambda: context)


def test_https_verifies_certificates(tls_server: LocalServer) -> None:
    policy = UrlPolicy(allowed_hosts=frozenset({"localhost"}))
    message = refusal(f"https://localhost:{tls_server.port}/cat.png", policy)
    assert "CERTIFICATE_VERIFY_FAILED" in message


def test_https_fetches_with_the_url_host_as_server_name(
    tls_server: LocalServer, certificate: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    trust(monkeypatch, certificate[0])
    policy = UrlPolicy(allowed_hosts=frozenset({"localhost"}))
    assert fetch_url(f"https://localhost:{tls_server.port}/cat.png", policy=policy) == BODY
    # The certificate names localhost only: by IP address the host name check must fail.
    message = refusal(f"https://127.0.0.1:{tls_server.port}/cat.png", LOCAL)
    assert "CERTIFICATE_VERIFY_FAILED" in message
    assert "mismatch" in message


# --- off-machine refusals inside an empty network namespace ----------------------------------

NAMESPACE_SCRIPT = """
from blipserve.errors import InvalidImage
from blipserve.processing.fetch import fetch_url
from blipserve.processing.limits import ImageLimits

for url in ("http://10.0.0.1/cat.png", "http://169.254.169.254/latest/meta-data/"):
    try:
        fetch_url(url, ImageLimits(timeout_s=2.0))
    except InvalidImage as err:
        print(err)
    else:
        print("fetched", url)
"""


def test_refusals_inside_a_network_namespace() -> None:
    """Even a broken check could not reach 10.0.0.1 from here: the namespace has no network,
    so a connection attempt would show up as 'unreachable' instead of the policy refusal."""
    if shutil.which("unshare") is None:
        pytest.skip("unshare is not installed")
    probe = subprocess.run(["unshare", "-rn", "true"], capture_output=True, text=True)
    if probe.returncode != 0:
        pytest.skip(f"cannot create a network namespace: {probe.stderr.strip()}")
    env = {k: v for k, v in os.environ.items() if k.lower() not in PROXY_VARIABLES}
    result = subprocess.run(
        ["unshare", "-rn", sys.executable, "-c", NAMESPACE_SCRIPT],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        f"URL http://10.0.0.1/cat.png refused: 10.0.0.1 is a private address {HINT}",
        "URL http://169.254.169.254/latest/meta-data/ refused: 169.254.169.254 is the cloud "
        f"metadata address {HINT}",
    ]
