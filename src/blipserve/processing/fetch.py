"""Download an image URL without letting a caller aim the server at its own network (SSRF).

By default only public addresses are fetched: loopback, private, link-local (the cloud
metadata address among them), multicast, reserved and other special-purpose addresses are
refused, in their IPv4-mapped, NAT64 and 6to4 IPv6 forms too. :class:`UrlPolicy` opens
this up for intranet use.

The check runs at connect time, on the very address the socket connects to: the host is
resolved once, every address it resolves to is checked, then a checked address is
connected to. A DNS answer that changes between a check and the connect (rebinding)
therefore cannot slip through, and each redirect hop is checked the same way because it
opens a new connection. Environment proxies are ignored, since a proxy would make the
connection on our behalf, out of the check's sight.
"""

from __future__ import annotations

import functools
import http.client
import ipaddress
import socket
import ssl
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from email.message import Message
from typing import IO, Any

from blipserve.errors import InvalidImage
from blipserve.processing.limits import DEFAULT_LIMITS, ImageLimits, megabytes, preview

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

_USER_AGENT = "blipserve"
_CHUNK_BYTES = 64 * 1024
_ALLOW_HINT = "pass --allow-private-urls or allow the host to fetch from it"

# Addresses some cloud providers serve instance credentials from (AWS, GCP, Azure, ...).
_METADATA_ADDRESSES = frozenset(map(ipaddress.ip_address, ("169.254.169.254", "fd00:ec2::254")))
# Ranges named in refusals; whatever else is not global is refused as "special-purpose".
_NAMED_RANGES = tuple(
    (ipaddress.ip_network(network), phrase)
    for network, phrase in (
        ("100.64.0.0/10", "in the shared address space 100.64.0.0/10 (carrier-grade NAT)"),
        ("10.0.0.0/8", "a private address"),
        ("172.16.0.0/12", "a private address"),
        ("192.168.0.0/16", "a private address"),
        ("fc00::/7", "a unique-local (private) address"),
        ("fec0::/10", "a site-local address"),
    )
)
_NAT64 = ipaddress.ip_network("64:ff9b::/96")  # well-known prefix; the IPv4 address is the tail


@dataclass(frozen=True)
class UrlPolicy:
    """Which addresses a URL fetch may connect to; the default allows public ones only.

    ``allow_private`` allows every address (intranet use, tests). ``allowed_hosts`` holds
    host names (matched exactly, case-insensitively, against the URL's host), IP literals
    and CIDR networks ("10.0.0.0/8") that are allowed although not public.
    """

    allow_private: bool = False
    allowed_hosts: frozenset[str] = frozenset()
    _names: frozenset[str] = field(init=False, repr=False, compare=False)
    _networks: tuple[IPNetwork, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        names, networks = set(), []
        for entry in self.allowed_hosts:
            host = entry.strip().strip("[]").rstrip(".").lower()
            try:
                networks.append(ipaddress.ip_network(host, strict=False))
            except ValueError:
                if not host or "/" in host:
                    raise ValueError(
                        f"allowed host {entry!r} is not a host name, IP address or CIDR network"
                    ) from None
                names.add(host)
        object.__setattr__(self, "allowed_hosts", frozenset(self.allowed_hosts))
        object.__setattr__(self, "_names", frozenset(names))
        object.__setattr__(self, "_networks", tuple(networks))

    def allows_name(self, host: str) -> bool:
        """Whether ``host`` (a URL's host name) is allowed whatever it resolves to."""
        return host.rstrip(".").lower() in self._names

    def allows_address(self, ip: IPAddress) -> bool:
        """Whether ``ip`` is allowed although it may not be public."""
        if self.allow_private:
            return True
        candidates = [ip]
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            candidates.append(ip.ipv4_mapped)
        return any(_within(a, network) for a in candidates for network in self._networks)


DEFAULT_URL_POLICY = UrlPolicy()


def check_address(ip: IPAddress, policy: UrlPolicy = DEFAULT_URL_POLICY) -> None:
    """Raise InvalidImage unless ``ip`` is a public unicast address or ``policy`` allows it."""
    if policy.allows_address(ip):
        return
    reason = _refusal_reason(ip)
    if reason is not None:
        raise InvalidImage(f"{ip} is {reason} ({_ALLOW_HINT})")


def _refusal_reason(ip: IPAddress) -> str | None:
    """Why ``ip`` is not a public unicast address ("a loopback address"), or None if it is."""
    if isinstance(ip, ipaddress.IPv6Address):
        embedded = _embedded_ipv4(ip)
        if embedded is not None:  # judged by the IPv4 address the packets end up at
            kind, v4 = embedded
            inner = _refusal_reason(v4)
            return f"{kind} of {v4}, {inner}" if inner else None
    if ip.is_unspecified:
        return "the unspecified address"
    if ip.is_loopback:
        return "a loopback address"
    if ip in _METADATA_ADDRESSES:
        return "the cloud metadata address"
    if ip.is_link_local:
        return "a link-local address"
    if ip.is_multicast:
        return "a multicast address"
    for network, phrase in _NAMED_RANGES:
        if _within(ip, network):
            return phrase
    if ip.is_reserved:
        return "a reserved address"
    if not ip.is_global:
        return "a special-purpose address that is not globally routable"
    return None


def _within(ip: IPAddress, network: IPNetwork) -> bool:
    # ``in`` alone compares the low bits of an address with a network of the other version.
    return ip.version == network.version and ip in network


def _embedded_ipv4(ip: ipaddress.IPv6Address) -> tuple[str, ipaddress.IPv4Address] | None:
    """The IPv4 address an IPv4-mapped, NAT64 or 6to4 address reaches, with the form's name."""
    if ip.ipv4_mapped is not None:
        return "an IPv4-mapped address", ip.ipv4_mapped
    if ip in _NAT64:
        return "a NAT64 address", ipaddress.IPv4Address(int(ip) & 0xFFFF_FFFF)
    if ip.sixtofour is not None:
        return "a 6to4 address", ip.sixtofour
    return None


# --- connecting -------------------------------------------------------------------------------


def _connect_checked(host: str, port: int, timeout: Any, policy: UrlPolicy) -> socket.socket:
    """Resolve ``host``, check every address it resolves to, then connect to a checked one."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    addresses = [(family, sockaddr) for family, _, _, _, sockaddr in infos]
    if not policy.allows_name(host):
        for _, sockaddr in addresses:
            check_address(ipaddress.ip_address(sockaddr[0]), policy)
    seconds = timeout if isinstance(timeout, int | float) else socket.getdefaulttimeout()
    error: OSError = OSError(f"{host} resolves to no address")
    for family, sockaddr in addresses:
        try:
            return _open_socket(family, sockaddr, seconds)
        except OSError as err:  # try the next address, as socket.create_connection does
            error = err
    raise error


def _open_socket(family: int, sockaddr: tuple[Any, ...], timeout: float | None) -> socket.socket:
    """Connect a TCP socket to ``sockaddr`` exactly (no resolution): the one place we connect."""
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.settimeout(timeout)
        sock.connect(sockaddr)
    except BaseException:
        sock.close()
        raise
    return sock


@functools.cache
def _ssl_context() -> ssl.SSLContext:
    """The system's default verification (certificates, host names), made once."""
    context = ssl.create_default_context()
    context.set_alpn_protocols(["http/1.1"])
    return context


class _GuardedHTTPConnection(http.client.HTTPConnection):
    """An HTTPConnection that connects only to addresses ``policy`` allows."""

    def __init__(self, host: str, *, policy: UrlPolicy, **kwargs: Any) -> None:
        super().__init__(host, **kwargs)
        self.policy = policy

    def connect(self) -> None:
        self.sock = _connect_checked(self.host, self.port, self.timeout, self.policy)


class _GuardedHTTPSConnection(http.client.HTTPSConnection):
    """An HTTPSConnection that connects only to addresses ``policy`` allows."""

    def __init__(self, host: str, *, policy: UrlPolicy, **kwargs: Any) -> None:
        self.ssl_context = _ssl_context()
        super().__init__(host, context=self.ssl_context, **kwargs)
        self.policy = policy

    def connect(self) -> None:
        sock = _connect_checked(self.host, self.port, self.timeout, self.policy)
        self.sock = self.ssl_context.wrap_socket(sock, server_hostname=self.host)  # SNI + verify


class _GuardedHTTPHandler(urllib.request.HTTPHandler):
    def __init__(self, policy: UrlPolicy) -> None:
        super().__init__()
        self.policy = policy

    def http_open(self, req: urllib.request.Request) -> Any:
        return _open_guarded(self, _GuardedHTTPConnection, req, self.policy)


class _GuardedHTTPSHandler(urllib.request.HTTPSHandler):
    def __init__(self, policy: UrlPolicy) -> None:
        super().__init__()
        self.policy = policy

    def https_open(self, req: urllib.request.Request) -> Any:
        return _open_guarded(self, _GuardedHTTPSConnection, req, self.policy)


def _open_guarded(
    handler: urllib.request.AbstractHTTPHandler,
    connection: type[http.client.HTTPConnection],
    req: urllib.request.Request,
    policy: UrlPolicy,
) -> Any:
    try:
        return handler.do_open(connection, req, policy=policy)
    except InvalidImage as err:  # raised by check_address in connect()
        raise InvalidImage(f"URL {_describe_url(req.full_url)} refused: {err.reason}") from None


def _build_opener(limits: ImageLimits, policy: UrlPolicy) -> urllib.request.OpenerDirector:
    """http(s) only, through the guarded connections; no proxies, no file:, ftp: or data:."""
    opener = urllib.request.OpenerDirector()
    for handler in (
        _GuardedHTTPHandler(policy),
        _GuardedHTTPSHandler(policy),
        _RedirectPolicy(limits.max_redirects),
        urllib.request.HTTPDefaultErrorHandler(),
        urllib.request.HTTPErrorProcessor(),
        urllib.request.UnknownHandler(),
    ):
        opener.add_handler(handler)
    return opener


# --- fetching ---------------------------------------------------------------------------------


RETRYABLE_STATUS = (408, 429)  # and every 5xx


def fetch_url(
    url: str, limits: ImageLimits = DEFAULT_LIMITS, policy: UrlPolicy = DEFAULT_URL_POLICY
) -> bytes:
    """Download an http(s) URL with a timeout, a redirect cap, a byte cap and ``policy``'s
    address check on every connection (the first and each redirect target)."""
    check_url(url)
    request = urllib.request.Request(url, headers={"User-Agent": _USER_AGENT})
    where = _describe_url(url)
    try:
        with _build_opener(limits, policy).open(request, timeout=limits.timeout_s) as response:
            return _read_capped(response, where, limits)
    except urllib.error.HTTPError as err:
        err.close()
        retry = err.code >= 500 or err.code in RETRYABLE_STATUS
        message = f"fetching {where} failed: HTTP {err.code} {err.reason}"
        raise InvalidImage(message, transient=retry) from None
    except urllib.error.URLError as err:
        raise InvalidImage(_connection_message(err.reason, url), transient=True) from None
    except TimeoutError:
        message = f"timed out after {limits.timeout_s:g} s fetching {where}"
        raise InvalidImage(message, transient=True) from None
    except (OSError, http.client.HTTPException) as err:  # resets, broken responses
        raise InvalidImage(f"fetching {where} failed: {err}", transient=True) from None
    except ValueError as err:
        raise InvalidImage(f"fetching {where} failed: {err}") from None


def check_url(url: str) -> None:
    """Raise InvalidImage unless ``url`` is a well-formed http(s) URL (nothing is fetched)."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme.lower() not in ("http", "https"):
        raise InvalidImage(
            f"unsupported URL scheme {parts.scheme!r}; only http:// and https:// are fetched"
        )
    if not parts.hostname:
        raise InvalidImage(f"URL has no host: {preview(url)}")
    try:
        parts.port  # noqa: B018 (parsing the port is the check)
    except ValueError:
        raise InvalidImage(f"URL has an invalid port: {preview(url)}") from None


class _RedirectPolicy(urllib.request.HTTPRedirectHandler):
    """Follow at most ``max_redirects`` redirects to http(s) URLs; the address check happens
    when the redirect's connection opens. One instance serves one fetch, so it can count."""

    def __init__(self, max_redirects: int) -> None:
        super().__init__()
        self.max_redirects = max_redirects
        self.followed = 0

    def http_error_302(
        self,
        req: urllib.request.Request,
        fp: IO[bytes],
        code: int,
        msg: str,
        headers: Message,
    ) -> Any:
        location = headers.get("Location") or headers.get("URI")
        if location:  # without one, urllib reports the 3xx response as an HTTP error
            try:
                self._check(req.full_url, urllib.parse.urljoin(req.full_url, location))
            except InvalidImage:
                fp.close()
                raise
        return super().http_error_302(req, fp, code, msg, headers)

    http_error_301 = http_error_303 = http_error_307 = http_error_308 = http_error_302

    def _check(self, url: str, target: str) -> None:
        self.followed += 1
        if self.followed > self.max_redirects:
            raise InvalidImage(
                f"too many redirects fetching {_describe_url(url)} (more than {self.max_redirects})"
            )
        try:
            check_url(target)
        except InvalidImage as err:
            raise InvalidImage(f"redirect refused: {err.reason}") from None


def _read_capped(response: Any, where: str, limits: ImageLimits) -> bytes:
    """Read the body in chunks, stopping as soon as it exceeds the byte or time limit."""
    declared = response.headers.get("Content-Length")
    if declared and declared.isdigit() and int(declared) > limits.max_bytes:
        raise InvalidImage(
            f"{where} is {int(declared)} bytes, over the {megabytes(limits.max_bytes)} limit"
        )
    deadline = time.monotonic() + limits.total_timeout_s
    body = bytearray()
    while chunk := response.read1(_CHUNK_BYTES):  # read1: whatever arrived, so we see the clock
        body += chunk
        if len(body) > limits.max_bytes:
            raise InvalidImage(f"{where} is over the {megabytes(limits.max_bytes)} limit")
        if time.monotonic() > deadline:
            raise InvalidImage(
                f"download of {where} took over {limits.total_timeout_s:g} s; gave up",
                transient=True,
            )
    return bytes(body)


def _connection_message(reason: Any, url: str) -> str:
    parts = urllib.parse.urlsplit(url)
    host = parts.hostname or "?"
    port = parts.port or (443 if parts.scheme.lower() == "https" else 80)
    if isinstance(reason, ConnectionRefusedError):
        return f"cannot connect to {host}:{port}: connection refused"
    if isinstance(reason, socket.gaierror):
        return f"cannot resolve host {host!r}"
    if isinstance(reason, TimeoutError):
        return f"timed out connecting to {host}:{port}"
    detail = getattr(reason, "strerror", None) or str(reason)
    return f"cannot fetch from {host}:{port}: {detail}"


def _describe_url(url: str) -> str:
    """scheme://host[:port]/path, without credentials or query string (signed URLs hold secrets)."""
    parts = urllib.parse.urlsplit(url)
    netloc = parts.netloc.rpartition("@")[2]
    text = f"{parts.scheme}://{netloc}{parts.path}"
    return text if len(text) <= 120 else text[:117] + "..."
