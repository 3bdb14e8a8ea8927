"""The address policy as a pure function on resolved addresses: no traffic is sent anywhere."""

from __future__ import annotations

import ipaddress

import pytest

from media import AddressPolicy, RefusedAddress, address_refusal


@pytest.mark.parametrize(
    ("address", "reason"),
    [
        ("127.0.0.1", "loopback"),
        ("127.255.0.9", "loopback"),
        ("::1", "loopback"),
        ("10.1.2.3", "private"),
        ("172.16.0.1", "private"),
        ("192.168.1.1", "private"),
        ("fd12:3456::1", "private"),
        ("169.254.10.10", "link-local"),
        ("fe80::1", "link-local"),
        ("224.0.0.251", "multicast"),
        ("ff02::1", "multicast"),
        ("0.0.0.0", "unspecified"),
        ("::", "unspecified"),
        ("240.0.0.1", "reserved"),
        ("255.255.255.255", "reserved"),
        ("100.64.0.1", "not publicly routable"),  # carrier-grade NAT
        ("198.18.0.1", "private"),  # benchmarking
        ("192.0.2.10", "private"),  # documentation
        # Cloud metadata services, including the ones Python calls global.
        ("169.254.169.254", "metadata"),
        ("169.254.170.2", "metadata"),
        ("fd00:ec2::254", "metadata"),
        ("100.100.100.200", "metadata"),
        ("192.0.0.192", "metadata"),
        ("168.63.129.16", "metadata"),
        # IPv4 addresses carried inside IPv6 ones.
        ("::ffff:127.0.0.1", "loopback"),
        ("::ffff:169.254.169.254", "metadata"),
        ("2002:7f00:1::", "loopback"),  # 6to4
        ("64:ff9b::a00:1", "private"),  # NAT64 of 10.0.0.1
        ("2001:0:4136:e378:8000:63bf:3fff:fdd2", "private"),  # Teredo, client 192.0.2.45
    ],
)
def test_non_public_addresses_are_refused(address: str, reason: str) -> None:
    refusal = address_refusal(ipaddress.ip_address(address))

    assert refusal is not None and reason in refusal


@pytest.mark.parametrize("address", ["93.184.215.14", "8.8.8.8", "2606:4700::6810:84e5", "::ffff:8.8.8.8"])
def test_public_addresses_are_allowed(address: str) -> None:
    assert address_refusal(ipaddress.ip_address(address)) is None


def addresses(*texts: str) -> list:
    return [ipaddress.ip_address(text) for text in texts]


def test_default_policy_refuses_a_host_if_any_address_is_refused() -> None:
    policy = AddressPolicy()

    policy.check("media.example", addresses("93.184.215.14"))
    with pytest.raises(RefusedAddress, match=r"media\.example \(10\.0\.0\.5\) is a private address"):
        policy.check("media.example", addresses("93.184.215.14", "10.0.0.5"))


def test_allowlist_names_hosts_addresses_and_networks() -> None:
    policy = AddressPolicy.from_allowlist(" Minio.Internal. ,127.0.0.1, 10.20.0.0/16 ,[::1]")

    policy.check("minio.internal", addresses("10.9.9.9"))  # by name, whatever it resolves to
    policy.check("MINIO.internal.", addresses("169.254.169.254"))
    policy.check("127.0.0.1", addresses("127.0.0.1"))
    policy.check("localhost", addresses("127.0.0.1", "::1"))
    policy.check("cache", addresses("10.20.3.4"))
    with pytest.raises(RefusedAddress, match="LLAVA_URL_ALLOWLIST"):
        policy.check("cache", addresses("10.21.3.4"))
    with pytest.raises(RefusedAddress, match="loopback"):
        policy.check("localhost", addresses("127.0.0.2"))


def test_an_allowed_name_does_not_allow_other_names_for_the_same_address() -> None:
    policy = AddressPolicy.from_allowlist("localhost")

    policy.check("localhost", addresses("127.0.0.1"))
    with pytest.raises(RefusedAddress):
        policy.check("127.0.0.1", addresses("127.0.0.1"))


@pytest.mark.parametrize("entry", ["http://host", "host/path", "user@host", "10.0.0.0/33", "1.2.3"])
def test_allowlist_rejects_what_is_not_a_host_address_or_network(entry: str) -> None:
    with pytest.raises(ValueError, match="not a host name"):
        AddressPolicy.from_allowlist(entry)


def test_empty_allowlist_is_the_default_policy() -> None:
    assert AddressPolicy.from_allowlist("") == AddressPolicy.from_allowlist(" , ") == AddressPolicy()
