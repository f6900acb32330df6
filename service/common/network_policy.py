"""Which network addresses a webhook may be sent to (the server-side request forgery rule).

Dispatch POSTs to URLs that partners register, from inside our network. Without a rule a
partner could register ``http://169.254.169.254/latest/meta-data/`` or ``http://10.0.0.5/admin``
and make the service call the cloud metadata endpoint or an internal host. So:

- Only ``http`` and ``https`` URLs with a host are accepted.
- An address that is not globally routable is refused unless private networks are allowed
  (``OPENVPP_WEBHOOK_ALLOW_PRIVATE_NETWORKS=true``, which tests and local demos set): loopback,
  private (RFC 1918), link-local, shared/CGNAT (100.64.0.0/10), unique-local (fc00::/7),
  site-local, multicast, unspecified, reserved, documentation and benchmarking ranges. An
  IPv6 address that embeds an IPv4 one (IPv4-mapped ``::ffff:a.b.c.d``, IPv4-compatible,
  6to4 ``2002::/16``, NAT64 ``64:ff9b::/96``) is judged by the IPv4 address it reaches.
- Cloud metadata addresses (169.254.169.254, fd00:ec2::254, 100.100.100.200, 192.0.0.192,
  168.63.129.16) are refused even when private networks are allowed: no legitimate webhook
  lives there, and a demo that allows 127.0.0.1 must not thereby expose instance credentials.
- Host names ``localhost`` and ``*.localhost`` (RFC 6761: always loopback) are refused at
  registration like 127.0.0.1.
- Legacy numeric IPv4 forms (``127.1``, ``0x7f000001``, ``2130706433``, octal parts) are
  refused always: resolvers read them as addresses, and they exist to slip past checks.

Registration (``webhook_url_violation``) can only judge literal addresses: a name may resolve
anywhere and change later. Delivery therefore resolves every name itself and checks every
resolved address with ``address_refused`` before connecting (see ``service/dispatch/delivery.py``).

Both judge the host as the HTTP client will connect to it (``webhook_target``): parsed by
yarl, as aiohttp parses it, not by ``urllib``. The two differ on hosts that are not ASCII:
``urllib`` leaves ``１２７.０.０.１`` (full-width digits), ``127。0。0。1`` or circled digits as
they are, which no address check recognises, while yarl's IDNA encoding turns them into
``127.0.0.1``, which aiohttp then connects to without asking any resolver.
"""

from __future__ import annotations

import ipaddress
import re
import socket
from typing import NamedTuple

from yarl import URL

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

ALLOW_SETTING = "OPENVPP_WEBHOOK_ALLOW_PRIVATE_NETWORKS"
LEGACY_IPV4_RULE = "must write an IPv4 address as four decimal numbers (a.b.c.d)"

CLOUD_METADATA_ADDRESSES: frozenset[IPAddress] = frozenset(
    ipaddress.ip_address(text)
    for text in (
        "169.254.169.254",  # AWS, GCP, Azure, OpenStack, DigitalOcean, Oracle
        "169.254.170.2",  # AWS ECS task metadata
        "fd00:ec2::254",  # AWS over IPv6
        "100.100.100.200",  # Alibaba Cloud
        "192.0.0.192",  # Oracle Cloud (legacy)
        "168.63.129.16",  # Azure wire server
    )
)

_SHARED_CGNAT = ipaddress.ip_network("100.64.0.0/10")
_NAT64 = ipaddress.ip_network("64:ff9b::/96")
# RFC 8215's local-use translation prefix: Python 3.11 counts it as global.
_LOCAL_NAT64 = ipaddress.ip_network("64:ff9b:1::/48")
_IPV4_COMPATIBLE = ipaddress.ip_network("::/96")
_SITE_LOCAL = ipaddress.ip_network("fec0::/10")
_UNIQUE_LOCAL = ipaddress.ip_network("fc00::/7")
_RFC1918 = tuple(ipaddress.ip_network(n) for n in ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16"))


def reachable_address(ip: IPAddress) -> IPAddress:
    """The address a connection to ``ip`` really reaches: the IPv4 one an IPv6 form embeds."""
    if isinstance(ip, ipaddress.IPv4Address):
        return ip
    if ip.scope_id is not None:
        # A zone id does not change where an address leads, but it takes part in equality:
        # fd00:ec2::254%eth0 is in no set of plain addresses.
        ip = ipaddress.IPv6Address(int(ip))
    if ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    if ip.sixtofour is not None:
        return ip.sixtofour
    if ip in _NAT64 or (ip in _IPV4_COMPATIBLE and int(ip) > 1):
        return ipaddress.IPv4Address(int(ip) & 0xFFFF_FFFF)
    if ip in _LOCAL_NAT64:
        # RFC 6052's layout for a /48 prefix: the IPv4 address's first half in bits 48-63,
        # its second half in bits 72-87 (bits 64-71 are the zero "u" octet).
        value = int(ip)
        return ipaddress.IPv4Address((value >> 64 & 0xFFFF) << 16 | (value >> 40 & 0xFFFF))
    return ip


def address_class(ip: IPAddress) -> str | None:
    """What makes ``ip`` unfit for a webhook, or None for a globally routable unicast address."""
    ip = reachable_address(ip)
    if ip in CLOUD_METADATA_ADDRESSES:
        return "cloud metadata"
    if ip.is_unspecified:
        return "unspecified"
    if ip.is_loopback:
        return "loopback"
    if ip.is_link_local:
        return "link-local"
    if ip.is_multicast:
        return "multicast"
    if isinstance(ip, ipaddress.IPv4Address):
        if ip in _SHARED_CGNAT:
            return "shared (CGNAT)"
        if any(ip in net for net in _RFC1918):
            return "private"
    else:
        if ip in _UNIQUE_LOCAL:
            return "unique-local"
        if ip in _SITE_LOCAL:
            return "site-local"
    if not ip.is_global:
        return "reserved or non-global"
    return None


def refusal_reason(ip: IPAddress, *, allow_private_networks: bool) -> str | None:
    """Why ``ip`` is refused under the rule above (e.g. ``"loopback"``), or None when allowed."""
    kind = address_class(ip)
    if kind is None:
        return None
    if kind == "cloud metadata" or not allow_private_networks:
        return kind
    return None


def address_refused(ip: IPAddress, *, allow_private_networks: bool) -> bool:
    """Whether a webhook may not connect to the (resolved) address ``ip``."""
    return refusal_reason(ip, allow_private_networks=allow_private_networks) is not None


def literal_address(host: str) -> IPAddress | None:
    """The address a URL host names literally (``[::1]`` without brackets), else None."""
    text = host.strip("[]")
    try:
        return ipaddress.ip_address(text.removesuffix(".") if "." in text else text)
    except ValueError:
        return None


_NUMERIC_HOST = re.compile(r"[0-9a-fA-FxX.]+")


def legacy_ipv4(host: str) -> ipaddress.IPv4Address | None:
    """The address a legacy numeric IPv4 form (``127.1``, ``0x7f.0.0.1``, ``2130706433``,
    octal ``0177.0.0.1``) stands for, or None. The C resolver accepts these; we refuse them
    outright, since they exist to slip past checks that only know a.b.c.d."""
    if literal_address(host) is not None or not _NUMERIC_HOST.fullmatch(host):
        return None
    try:
        return ipaddress.IPv4Address(socket.inet_aton(host.removesuffix(".")))
    except OSError:
        return None


class WebhookTarget(NamedTuple):
    """Where a webhook URL leads, as the HTTP client reads it."""

    # Parsed once: delivery sends to this object, so that what was judged is what is used.
    url: URL
    scheme: str
    # Lowercase and IDNA-encoded (ASCII): the name resolved, or the address connected to.
    host: str
    port: int


def webhook_target(url: str) -> WebhookTarget | None:
    """``url`` parsed as aiohttp parses it (yarl), or None when it is not an absolute
    http(s) URL with a host and a valid port. See the module's docstring for why not urllib."""
    try:
        parsed = URL(url)
        host = parsed.raw_host
        port = parsed.port
    # ValueError: a malformed port, or a host IDNA cannot encode. IndexError: yarl 1.25's
    # split of a bracketed host followed by an empty authority ("https://[::1]@/hook").
    except (ValueError, IndexError):
        return None
    if not host or parsed.scheme not in ("http", "https") or port is None:
        return None
    return WebhookTarget(parsed, parsed.scheme, host.lower(), port)


def webhook_url_violation(url: str, *, allow_private_networks: bool) -> str | None:
    """The rule ``url`` breaks as a webhook target (a field violation's text), or None.

    Checks the scheme, the host, and a literal address or ``localhost`` host; a host name is
    judged again at delivery, after DNS resolution.
    """
    target = webhook_target(url)
    if target is None:
        return "must be an absolute http:// or https:// URL with a host"
    host = target.host
    if legacy_ipv4(host) is not None:
        return LEGACY_IPV4_RULE
    ip = literal_address(host)
    if ip is None:
        name = host.rstrip(".").lower()
        if name == "localhost" or name.endswith(".localhost"):
            ip = ipaddress.IPv4Address("127.0.0.1")
        else:
            return None
    reason = refusal_reason(ip, allow_private_networks=allow_private_networks)
    if reason is None:
        return None
    if reason == "cloud metadata":
        return "must not be a cloud metadata address"
    article = "an" if reason[0] in "aeio" or reason.startswith("un") else "a"
    return f"must not be {article} {reason} address unless {ALLOW_SETTING}=true"
