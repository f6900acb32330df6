"""The webhook address rule: every class of address, with and without private networks."""

from __future__ import annotations

import ipaddress

import pytest

from service.common.network_policy import address_refused, webhook_url_violation

NON_PUBLIC = [
    ("127.0.0.1", "loopback"),
    ("127.8.9.10", "loopback"),
    ("::1", "loopback"),
    ("10.0.0.5", "private"),
    ("172.16.3.4", "private"),
    ("192.168.1.1", "private"),
    ("169.254.1.2", "link-local"),
    ("fe80::1", "link-local"),
    ("100.64.0.1", "shared (CGNAT)"),
    ("fd12:3456::1", "unique-local"),
    ("fec0::1", "site-local"),
    ("224.0.0.1", "multicast"),
    ("ff02::1", "multicast"),
    ("0.0.0.0", "unspecified"),
    ("::", "unspecified"),
    ("192.0.2.10", "reserved or non-global"),  # documentation
    ("240.0.0.1", "reserved or non-global"),
    # IPv6 forms that reach an IPv4 address are judged by it.
    ("::ffff:127.0.0.1", "loopback"),
    ("::ffff:10.1.1.1", "private"),
    ("2002:c0a8:0101::1", "private"),  # 6to4 of 192.168.1.1
    ("64:ff9b::7f00:1", "loopback"),  # NAT64 of 127.0.0.1
    ("64:ff9b:1:7f00:0:100::", "loopback"),  # local-use NAT64 (RFC 8215) of 127.0.0.1
    ("fe80::1%eth0", "link-local"),
]
METADATA = [
    "169.254.169.254",
    "fd00:ec2::254",
    "100.100.100.200",
    "::ffff:169.254.169.254",
    # A zone id takes part in an address's equality, not in where it leads.
    "fd00:ec2::254%eth0",
    "64:ff9b:1:a9fe:a9:fe00::",  # local-use NAT64 of 169.254.169.254
]
PUBLIC = ["93.184.216.34", "8.8.8.8", "2606:4700::1111", "::ffff:93.184.216.34"]


def host(address: str) -> str:
    # A zone id's "%" is written %25 in a URL (RFC 6874).
    return f"[{address.replace('%', '%25')}]" if ":" in address else address


@pytest.mark.parametrize(("address", "kind"), NON_PUBLIC)
def test_non_public_addresses_are_refused_unless_allowed(address: str, kind: str) -> None:
    ip = ipaddress.ip_address(address)
    assert address_refused(ip, allow_private_networks=False)
    assert not address_refused(ip, allow_private_networks=True)
    violation = webhook_url_violation(
        f"https://{host(address)}:8443/x", allow_private_networks=False
    )
    assert violation is not None
    assert f" {kind} address unless OPENVPP_WEBHOOK_ALLOW_PRIVATE_NETWORKS=true" in violation
    assert webhook_url_violation(f"https://{host(address)}/x", allow_private_networks=True) is None


@pytest.mark.parametrize("address", METADATA)
def test_metadata_addresses_are_always_refused(address: str) -> None:
    ip = ipaddress.ip_address(address)
    for allow in (False, True):
        assert address_refused(ip, allow_private_networks=allow)
        assert (
            webhook_url_violation(f"http://{host(address)}/latest", allow_private_networks=allow)
            == "must not be a cloud metadata address"
        )


@pytest.mark.parametrize("address", PUBLIC)
def test_public_addresses_are_allowed(address: str) -> None:
    assert not address_refused(ipaddress.ip_address(address), allow_private_networks=False)
    assert webhook_url_violation(f"https://{host(address)}/", allow_private_networks=False) is None


@pytest.mark.parametrize("name", ["localhost", "LOCALHOST.", "api.localhost"])
def test_localhost_names_are_loopback(name: str) -> None:
    assert webhook_url_violation(f"http://{name}:8080/", allow_private_networks=False) == (
        "must not be a loopback address unless OPENVPP_WEBHOOK_ALLOW_PRIVATE_NETWORKS=true"
    )
    assert webhook_url_violation(f"http://{name}:8080/", allow_private_networks=True) is None


@pytest.mark.parametrize(
    "url",
    [
        "ftp://h.example/",
        "https:///x",
        "h.example/x",
        "",
        "http://h.example:99999/",
        # A bracketed host before an empty authority: yarl's parser raises IndexError.
        "https://[::1]@/hook",
        "http://[x]@",
        "https://[::1]:443@",
    ],
)
def test_not_an_http_url_with_a_host(url: str) -> None:
    for allow in (False, True):
        assert webhook_url_violation(url, allow_private_networks=allow) == (
            "must be an absolute http:// or https:// URL with a host"
        )


def test_names_are_left_to_delivery() -> None:
    # A name may resolve anywhere and change; delivery checks what it resolves to.
    assert (
        webhook_url_violation("https://partner.example/hook", allow_private_networks=False) is None
    )


@pytest.mark.parametrize(
    "host", ["127.1", "0x7f.0.0.1", "0x7f000001", "2130706433", "0177.0.0.1", "10.1", "1"]
)
def test_legacy_numeric_ipv4_forms_are_refused_always(host: str) -> None:
    for allow in (False, True):
        assert webhook_url_violation(f"http://{host}:80/", allow_private_networks=allow) == (
            "must write an IPv4 address as four decimal numbers (a.b.c.d)"
        )


@pytest.mark.parametrize("host", ["cafe.example", "deadbeef.be", "0x.example", "a1.b2"])
def test_hex_looking_names_are_names(host: str) -> None:
    assert webhook_url_violation(f"http://{host}/", allow_private_networks=False) is None


@pytest.mark.parametrize(
    ("written", "rule"),
    [
        ("１２７.０.０.１", "must not be a loopback address unless"),  # full-width digits
        ("127。0。0。1", "must not be a loopback address unless"),  # ideographic full stops
        ("①⑥⑨.②⑤④.①⑥⑨.②⑤④", "must not be a cloud metadata address"),  # circled digits
        ("①②⑦.①", "must write an IPv4 address as four decimal numbers"),
    ],
)
def test_an_address_in_other_digits_is_judged_as_the_address_it_becomes(
    written: str, rule: str
) -> None:
    # The HTTP client's URL parser (yarl) encodes these hosts to 127.0.0.1, 169.254.169.254
    # and 127.1, and connects there without a lookup.
    violation = webhook_url_violation(f"http://{written}:8080/hook", allow_private_networks=False)
    assert violation is not None
    assert violation.startswith(rule)


def test_an_international_name_is_a_name() -> None:
    url = "https://bücher.example/hook"
    assert webhook_url_violation(url, allow_private_networks=False) is None


def test_a_trailing_dot_does_not_hide_an_address() -> None:
    assert webhook_url_violation("http://127.0.0.1./", allow_private_networks=False) == (
        "must not be a loopback address unless OPENVPP_WEBHOOK_ALLOW_PRIVATE_NETWORKS=true"
    )
