"""Where an admin may point the orchestrator: the rule checked when a replica's endpoint or an llm_endpoint's URI is
saved, so that the gateway and the prober only ever call what an engine may be.

A URL is refused when any address its host stands for (a literal in any spelling the client takes: dotted, hex,
octal or one integer, IPv6 with an IPv4 inside; or a name, resolved as the client would) is
- link-local (169.254.0.0/16 and fe80::/10: where clouds serve their metadata and credentials), unspecified
  (0.0.0.0/8, ::), multicast or reserved, unless an operator allowed its range (`ORCH_OUTBOUND_ALLOW_CIDRS`);
- at the URL's port, this orchestrator itself, its database or its Redis (no setting lifts that).
Loopback and private addresses on other ports are allowed: that is where engines run.
"""

from __future__ import annotations

import asyncio
import re
import socket
from collections.abc import Callable
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network, ip_address, ip_network

from yarl import URL

from orchestrator.domain.errors import InvalidInput
from orchestrator.platform.settings import Settings

Address = IPv4Address | IPv6Address
IpNetwork = IPv4Network | IPv6Network

RESOLVE_TIMEOUT_S = 5.0
_THIS_NETWORK = ip_network("0.0.0.0/8")  # "this host on this network": Linux connects 0.0.0.0 to itself
_IPV4_SPELLING = re.compile(r"[0-9a-fx.]+")  # what inet_aton may take: 169.254.169.254, 0xa9fea9fe, 0251.0376...


class UnsafeUrl(InvalidInput):
    pass


@dataclass(frozen=True)
class Listener:
    """A service of ours that listens on `host:port`: no URL may point at it."""

    what: str
    host: str
    port: int
    may_listen_anywhere: bool = False
    """When it runs on this machine, it may listen on every address of it (the database and Redis: this process
    cannot see their listening addresses). A listener whose host is 0.0.0.0 or :: does anyway."""


def literal_address(host: str) -> Address | None:
    """The address `host` spells without a lookup, as the client would read it; None for a name."""
    host = host.strip("[]").split("%", 1)[0]  # a zone id (fe80::1%eth0) names an interface, not another address
    if ":" in host:
        try:
            return ip_address(host)
        except ValueError:
            return None
    if not _IPV4_SPELLING.fullmatch(host.lower()):
        return None
    try:  # the C library's reading (getaddrinfo's too): 2852039166, 0xa9.0xfe.43518, 0251.0376.0251.0376
        return IPv4Address(socket.inet_aton(host))
    except OSError:
        return None


def plain(address: Address) -> Address:
    """An IPv4-mapped IPv6 address (::ffff:169.254.169.254) is the IPv4 address it carries: that is where it goes."""
    if isinstance(address, IPv6Address):
        if address.ipv4_mapped is not None:
            return address.ipv4_mapped
        if address.scope_id:
            return IPv6Address(str(address).split("%", 1)[0])
    return address


_REFUSED_KINDS: tuple[tuple[Callable[[Address], bool], str], ...] = (
    (lambda a: a.is_link_local, "a link-local address (where clouds serve instance metadata and credentials)"),
    (lambda a: a.is_unspecified or a in _THIS_NETWORK, "an unspecified address (it reaches this machine itself)"),
    (lambda a: a.is_multicast, "a multicast address"),
    (lambda a: a.is_reserved, "a reserved address"),
)


def kind_refused(address: Address, allowed: tuple[IpNetwork, ...] = ()) -> str | None:
    """Why `address` may not be called whatever its port (None: it may), unless inside an `allowed` range."""
    address = plain(address)
    # Loopback before the kinds: IPv6's ::1 sits in a reserved block, but an engine on it is fine.
    if address.is_loopback or any(address in network for network in allowed):
        return None
    return next((why for refused, why in _REFUSED_KINDS if refused(address)), None)


def is_local(address: Address) -> bool:
    """Whether `address` is one of this machine's: loopback, or one a socket can bind to."""
    address = plain(address)
    if address.is_loopback:
        return True
    family = socket.AF_INET6 if isinstance(address, IPv6Address) else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_DGRAM) as s:
            s.bind((str(address), 0))  # no packet is sent: the kernel only says whether the address is ours
    except OSError:
        return False
    return True


@dataclass(frozen=True)
class OutboundPolicy:
    listeners: tuple[Listener, ...]
    allowed: tuple[IpNetwork, ...] = ()
    resolve_timeout_s: float = RESOLVE_TIMEOUT_S

    @classmethod
    def from_settings(cls, settings: Settings) -> OutboundPolicy:
        listeners = [Listener("this orchestrator", settings.host, settings.port)]
        database = URL(settings.resolved_database_url)
        if (
            database.scheme.partition("+")[0] == "postgresql" and database.host
        ):  # no host: a Unix socket, no URL reaches
            port = database.port or 5432
            listeners.append(Listener("the orchestrator's database", database.host, port, may_listen_anywhere=True))
        redis = URL(settings.redis_url or "")
        if redis.host:
            port = redis.port or 6379
            listeners.append(Listener("the orchestrator's Redis", redis.host, port, may_listen_anywhere=True))
        return cls(tuple(listeners), allowed_ranges(settings.outbound_allow_cidrs))

    async def check(self, field: str, url: str) -> None:
        """Raise UnsafeUrl (naming `field`) when `url` may not be called; the URL is already a valid http(s) one."""
        parsed = URL(url)
        host, port = parsed.host or "", parsed.port or (443 if parsed.scheme == "https" else 80)
        named = host if literal_address(host) is None else None
        for address in await self._addresses(field, host):
            why = kind_refused(address, self.allowed)
            if why is None:
                why = await self._ours(address, port)
            if why is not None:
                shown = f"{host} resolves to {address}, which is" if named else f"{address} is"
                raise UnsafeUrl(field, f"{field} must not point there: {shown} {why}")

    async def _addresses(self, field: str, host: str) -> list[Address]:
        """Every address `host` stands for; a name is resolved off the event loop, within the timeout."""
        try:
            return await self._resolve(host)
        except (OSError, TimeoutError, UnicodeError) as e:
            raise UnsafeUrl(field, f"{field} must name a host that resolves: {host} does not resolve") from e

    async def _resolve(self, host: str) -> list[Address]:
        literal = literal_address(host)
        if literal is not None:
            return [literal]
        async with asyncio.timeout(self.resolve_timeout_s):
            found = await asyncio.get_running_loop().getaddrinfo(host, None, type=socket.SOCK_STREAM)
        return list(dict.fromkeys(ip_address(str(info[4][0]).split("%", 1)[0]) for info in found))

    async def _addresses_of(self, listener: Listener) -> set[Address]:
        try:
            return {plain(a) for a in await self._resolve(listener.host)}
        except (OSError, TimeoutError, UnicodeError):
            return set()  # it does not resolve: nothing of ours listens there that a URL could reach

    async def _ours(self, address: Address, port: int) -> str | None:
        """Which of our own listeners `address:port` is, said as the reason to refuse it."""
        address = plain(address)
        for listener in self.listeners:
            if listener.port != port:
                continue
            theirs = await self._addresses_of(listener)
            if address in theirs:
                return f"{listener.what} (at {listener.host}:{port})"
            anywhere = any(a.is_unspecified for a in theirs) or (
                listener.may_listen_anywhere and any(is_local(a) for a in theirs)
            )
            if anywhere and is_local(address):
                return f"{listener.what} (at port {port} on this machine)"
        return None


def allowed_ranges(text: str) -> tuple[IpNetwork, ...]:
    """`ORCH_OUTBOUND_ALLOW_CIDRS`: comma-separated CIDRs (an address alone is its /32 or /128)."""
    try:
        return tuple(ip_network(part.strip(), strict=False) for part in text.split(",") if part.strip())
    except ValueError as e:
        raise ValueError(f"ORCH_OUTBOUND_ALLOW_CIDRS: {e}") from e
