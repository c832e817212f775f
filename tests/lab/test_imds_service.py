"""The emulator's IMDS request logic: IMDSv2 tokens, listings and leaves, as EC2 answers."""

from __future__ import annotations

import json
import random
from collections.abc import Mapping

import pytest

from tools.lab.ec2.imds import (
    MAX_TOKEN_TTL_S,
    TOKEN_HEADER,
    TOKEN_PATH,
    TOKEN_TTL_HEADER,
    ImdsResponse,
    ImdsService,
    JsonLeaf,
    MetadataNode,
    MetadataTree,
)

PRIMARY_MAC = "02:00:00:00:00:01"
SECOND_MAC = "02:00:00:00:00:02"
IDENTITY = {
    "accountId": "123456789012",
    "instanceId": "i-0123456789abcdef0",
    "instanceType": "m5.large",
    "region": "us-west-2",
}


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def interface(mac: str, device: int, eni: str, ips: list[str], prefixes: list[str]) -> MetadataTree:
    return {
        "device-number": device,
        "interface-id": eni,
        "local-ipv4s": ips,
        "mac": mac,
        "network-card": 0,
        "ipv4-prefix": prefixes,
    }


def instance_tree(*, second_eni: bool = False) -> MetadataTree:
    macs: dict[str, MetadataNode] = {
        PRIMARY_MAC: interface(
            PRIMARY_MAC, 0, "eni-1", ["100.64.0.10", "100.64.0.11"], ["100.64.0.32/28"]
        )
    }
    if second_eni:
        macs[SECOND_MAC] = interface(SECOND_MAC, 1, "eni-2", ["100.64.64.10"], [])
    return {
        "meta-data": {
            "instance-id": "i-0123456789abcdef0",
            "mac": PRIMARY_MAC,
            "network": {"interfaces": {"macs": macs}},
        },
        "dynamic": {"instance-identity": {"document": JsonLeaf(IDENTITY)}},
    }


class Node:
    """A service plus the clock it runs on, with the calls a client makes."""

    def __init__(
        self,
        tree: MetadataTree | None = None,
        *,
        v1_allowed: bool = False,
        max_token_ttl_s: int = MAX_TOKEN_TTL_S,
    ) -> None:
        self.tree = tree if tree is not None else instance_tree()
        self.clock = FakeClock()
        self.tree_reads = 0
        self.service = ImdsService(
            self.read_tree,
            clock=self.clock,
            v1_allowed=v1_allowed,
            max_token_ttl_s=max_token_ttl_s,
        )

    def read_tree(self) -> MetadataTree:
        self.tree_reads += 1
        return self.tree

    def token(self, ttl: int = 60) -> str:
        response = self.service.handle("PUT", TOKEN_PATH, {TOKEN_TTL_HEADER: str(ttl)})
        assert response.status == 200, response
        return response.body.decode()

    def get(self, path: str, token: str | None = None) -> ImdsResponse:
        headers = {} if token is None else {TOKEN_HEADER: token}
        return self.service.handle("GET", path, headers)


@pytest.fixture
def node() -> Node:
    return Node()


# -- tokens ------------------------------------------------------------------------------


def test_token_flow_serves_metadata(node: Node) -> None:
    issued = node.service.handle("PUT", TOKEN_PATH, {TOKEN_TTL_HEADER: "21600"})
    assert issued.status == 200
    assert issued.headers[TOKEN_TTL_HEADER] == "21600"
    assert issued.headers["Server"] == "EC2ws"
    assert issued.headers["Content-Type"] == "text/plain"
    token = issued.body.decode()
    assert len(token) >= 32

    response = node.get("/latest/meta-data/instance-id", token)
    assert response.status == 200
    assert response.body == b"i-0123456789abcdef0"
    assert response.headers == {"Server": "EC2ws", "Content-Type": "text/plain"}


def test_tokens_are_distinct(node: Node) -> None:
    assert node.token() != node.token()


def test_header_names_are_case_insensitive(node: Node) -> None:
    issued = node.service.handle("PUT", TOKEN_PATH, {TOKEN_TTL_HEADER.lower(): "60"})
    assert issued.status == 200
    token = issued.body.decode()
    response = node.service.handle("GET", "/latest/meta-data/mac", {TOKEN_HEADER.upper(): token})
    assert response.status == 200
    assert response.body == PRIMARY_MAC.encode()


def test_imdsv2_is_required_by_default(node: Node) -> None:
    response = node.get("/latest/meta-data/instance-id")
    assert response.status == 401
    assert response.headers["Content-Type"] == "text/plain"


def test_unauthorised_comes_before_not_found(node: Node) -> None:
    assert node.get("/latest/meta-data/no-such-key").status == 401
    assert node.get("/elsewhere").status == 401


def test_v1_allowed_serves_without_token_but_checks_a_token_it_is_given() -> None:
    node = Node(v1_allowed=True)
    assert node.get("/latest/meta-data/instance-id").status == 200
    assert node.get("/latest/meta-data/instance-id", "not-a-token").status == 401
    assert node.get("/latest/meta-data/instance-id", node.token()).status == 200


def test_v1_can_be_switched_on_a_running_instance(node: Node) -> None:
    assert node.get("/latest/meta-data/mac").status == 401
    node.service.v1_allowed = True
    assert node.get("/latest/meta-data/mac").status == 200


def test_invalid_token_is_unauthorised(node: Node) -> None:
    node.token()
    assert node.get("/latest/meta-data/instance-id", "forged").status == 401
    assert node.get("/latest/meta-data/instance-id", "").status == 401


def test_token_expires_by_the_clock(node: Node) -> None:
    token = node.token(ttl=60)
    node.clock.advance(59.999)
    assert node.get("/latest/meta-data/mac", token).status == 200
    node.clock.advance(0.001)
    assert node.get("/latest/meta-data/mac", token).status == 401
    node.clock.advance(3600)
    assert node.get("/latest/meta-data/mac", token).status == 401


def test_each_token_has_its_own_ttl(node: Node) -> None:
    short, long = node.token(ttl=1), node.token(ttl=MAX_TOKEN_TTL_S)
    node.clock.advance(2)
    assert node.get("/latest/meta-data/mac", short).status == 401
    assert node.get("/latest/meta-data/mac", long).status == 200


@pytest.mark.parametrize(
    "ttl_headers",
    [
        {},
        {TOKEN_TTL_HEADER: "0"},
        {TOKEN_TTL_HEADER: "21601"},
        {TOKEN_TTL_HEADER: "-5"},
        {TOKEN_TTL_HEADER: "+60"},
        {TOKEN_TTL_HEADER: "60.0"},
        {TOKEN_TTL_HEADER: "1_0"},
        {TOKEN_TTL_HEADER: "sixty"},
        {TOKEN_TTL_HEADER: ""},
        {TOKEN_TTL_HEADER: "9" * 40},
    ],
    ids=repr,
)
def test_missing_or_invalid_ttl_is_bad_request(node: Node, ttl_headers: dict[str, str]) -> None:
    response = node.service.handle("PUT", TOKEN_PATH, ttl_headers)
    assert response.status == 400
    assert TOKEN_TTL_HEADER not in response.headers


@pytest.mark.parametrize("ttl", ["1", "21600", " 300 "])
def test_ttl_bounds_are_inclusive(node: Node, ttl: str) -> None:
    response = node.service.handle("PUT", TOKEN_PATH, {TOKEN_TTL_HEADER: ttl})
    assert response.status == 200
    assert response.headers[TOKEN_TTL_HEADER] == ttl.strip()


def test_lower_max_ttl_is_enforced() -> None:
    node = Node(max_token_ttl_s=300)
    assert node.service.handle("PUT", TOKEN_PATH, {TOKEN_TTL_HEADER: "300"}).status == 200
    assert node.service.handle("PUT", TOKEN_PATH, {TOKEN_TTL_HEADER: "301"}).status == 400


@pytest.mark.parametrize("max_ttl", [0, MAX_TOKEN_TTL_S + 1])
def test_max_ttl_beyond_what_ec2_allows_is_refused(max_ttl: int) -> None:
    with pytest.raises(ValueError, match="max_token_ttl_s"):
        ImdsService(dict, max_token_ttl_s=max_ttl)


def test_token_through_a_proxy_is_forbidden(node: Node) -> None:
    headers = {TOKEN_TTL_HEADER: "60", "x-forwarded-for": "100.64.0.99"}
    response = node.service.handle("PUT", TOKEN_PATH, headers)
    assert response.status == 403
    assert response.body != b""


def test_revoked_tokens_are_unauthorised(node: Node) -> None:
    first, second = node.token(), node.token()
    node.service.revoke_tokens()
    assert node.get("/latest/meta-data/mac", first).status == 401
    assert node.get("/latest/meta-data/mac", second).status == 401
    assert node.get("/latest/meta-data/mac", node.token()).status == 200


def test_expired_tokens_do_not_accumulate(node: Node) -> None:
    for _ in range(50):
        node.token(ttl=1)
        node.clock.advance(2)
    assert len(node.service._token_expiry) == 1


# -- methods -----------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["POST", "DELETE", "PATCH", "OPTIONS"])
def test_other_methods_are_not_allowed(node: Node, method: str) -> None:
    response = node.service.handle(method, "/latest/meta-data/mac", {TOKEN_HEADER: node.token()})
    assert response.status == 405
    assert response.headers["Allow"] == "GET, HEAD"


def test_put_on_metadata_is_not_allowed(node: Node) -> None:
    response = node.service.handle("PUT", "/latest/meta-data/mac", {TOKEN_TTL_HEADER: "60"})
    assert response.status == 405
    assert response.headers["Allow"] == "GET, HEAD"


@pytest.mark.parametrize("method", ["GET", "POST"])
def test_token_path_only_takes_put(node: Node, method: str) -> None:
    response = node.service.handle(method, TOKEN_PATH, {TOKEN_TTL_HEADER: "60"})
    assert response.status == 405
    assert response.headers["Allow"] == "PUT"


def test_head_answers_like_get_without_a_body(node: Node) -> None:
    token = node.token()
    found = node.service.handle("HEAD", "/latest/meta-data/mac", {TOKEN_HEADER: token})
    assert (found.status, found.body) == (200, b"")
    assert found.headers["Content-Type"] == "text/plain"
    missing = node.service.handle("HEAD", "/latest/meta-data/nothing", {TOKEN_HEADER: token})
    assert (missing.status, missing.body) == (404, b"")
    assert node.service.handle("HEAD", "/latest/meta-data/mac", {}).status == 401


# -- paths -------------------------------------------------------------------------------


def test_root_listing(node: Node) -> None:
    token = node.token()
    for path in ("/latest", "/latest/"):
        response = node.get(path, token)
        assert response.status == 200
        assert response.body == b"meta-data/\ndynamic/"


def test_listing_keeps_insertion_order_without_trailing_newline(node: Node) -> None:
    response = node.get("/latest/meta-data/", node.token())
    assert response.body == b"instance-id\nmac\nnetwork/"
    assert response.headers["Content-Type"] == "text/plain"


def test_directory_without_trailing_slash_is_listed_too(node: Node) -> None:
    node.tree = instance_tree(second_eni=True)
    token = node.token()
    with_slash = node.get("/latest/meta-data/network/interfaces/macs/", token)
    without = node.get("/latest/meta-data/network/interfaces/macs", token)
    assert with_slash.status == without.status == 200
    assert with_slash.body == without.body == f"{PRIMARY_MAC}/\n{SECOND_MAC}/".encode()


def test_interface_keys_under_its_mac(node: Node) -> None:
    token = node.token()
    base = f"/latest/meta-data/network/interfaces/macs/{PRIMARY_MAC}/"
    listing = node.get(base, token).body.decode().split("\n")
    assert listing == [
        "device-number",
        "interface-id",
        "local-ipv4s",
        "mac",
        "network-card",
        "ipv4-prefix",
    ]
    assert node.get(base + "device-number", token).body == b"0"
    assert node.get(base + "network-card", token).body == b"0"
    assert node.get(base + "interface-id", token).body == b"eni-1"
    assert node.get(base + "local-ipv4s", token).body == b"100.64.0.10\n100.64.0.11"
    assert node.get(base + "ipv4-prefix", token).body == b"100.64.0.32/28"


def test_empty_multi_line_leaf_is_an_empty_body(node: Node) -> None:
    node.tree = instance_tree(second_eni=True)
    path = f"/latest/meta-data/network/interfaces/macs/{SECOND_MAC}/ipv4-prefix"
    response = node.get(path, node.token())
    assert (response.status, response.body) == (200, b"")


def test_percent_encoded_mac_and_query_string(node: Node) -> None:
    encoded = PRIMARY_MAC.replace(":", "%3A")
    path = f"/latest/meta-data/network/interfaces/macs/{encoded}/interface-id?x=1"
    response = node.get(path, node.token())
    assert (response.status, response.body) == (200, b"eni-1")


@pytest.mark.parametrize(
    "path",
    [
        "/latest/meta-data/no-such-key",
        "/latest/meta-data/instance-id/",
        "/latest/meta-data/instance-id/deeper",
        "/latest/meta-data/instance-id/i-0",  # a substring of the leaf is not a key
        f"/latest/meta-data/network/interfaces/macs/{PRIMARY_MAC}/local-ipv4s/100.64.0.10",
        "/latest/meta-data/network/interfaces/macs/02:00:00:00:00:99/",
        "/latest/meta-data//mac",
        "/latest/meta-data/network//",
        "/latest/user-data",
        "/latest/dynamic/instance-identity/document/",
        "/latestx",
        "/2021-07-15/meta-data/",
        "/",
        "",
    ],
)
def test_not_found(node: Node, path: str) -> None:
    response = node.get(path, node.token())
    assert response.status == 404
    assert response.body == b"Not Found"
    assert response.headers["Content-Type"] == "text/plain"
    assert response.headers["Server"] == "EC2ws"


def test_json_leaf(node: Node) -> None:
    response = node.get("/latest/dynamic/instance-identity/document", node.token())
    assert response.status == 200
    assert response.headers["Content-Type"] == "application/json"
    assert json.loads(response.body) == IDENTITY
    assert list(json.loads(response.body)) == list(IDENTITY)  # EC2's key order is kept
    assert node.get("/latest/dynamic/instance-identity/", node.token()).body == b"document"


def test_bool_leaf_is_a_provider_bug() -> None:
    node = Node({"meta-data": {"flag": True}})
    with pytest.raises(TypeError, match="meta-data/flag"):
        node.get("/latest/meta-data/flag", node.token())


def test_tree_changes_between_requests_are_seen(node: Node) -> None:
    token = node.token()
    macs = "/latest/meta-data/network/interfaces/macs/"
    assert node.get(macs, token).body == f"{PRIMARY_MAC}/".encode()
    node.tree = instance_tree(second_eni=True)
    assert node.get(macs, token).body == f"{PRIMARY_MAC}/\n{SECOND_MAC}/".encode()
    assert node.get(macs + SECOND_MAC + "/interface-id", token).body == b"eni-2"


def test_provider_is_read_once_per_metadata_request_only(node: Node) -> None:
    token = node.token()
    assert node.tree_reads == 0  # issuing a token needs no metadata
    node.get("/latest/meta-data/mac", token)
    node.get("/latest/meta-data/nothing", token)
    assert node.tree_reads == 2
    node.get("/latest/meta-data/mac")  # refused before the tree is read
    assert node.tree_reads == 2


def test_requests_are_counted_per_path_whatever_the_status(node: Node) -> None:
    token = node.token()
    for _ in range(3):
        node.get("/latest/meta-data/mac", token)
    node.get("/latest/meta-data/mac?ignored=1")
    node.get("/latest/meta-data/nothing", token)
    node.service.handle("POST", "/latest/meta-data/mac", {})
    assert node.service.requests == {
        TOKEN_PATH: 1,
        "/latest/meta-data/mac": 5,
        "/latest/meta-data/nothing": 1,
    }


# -- property: every listing is consistent with what its entries serve -------------------


def random_tree(rng: random.Random, depth: int) -> dict[str, MetadataNode]:
    tree: dict[str, MetadataNode] = {}
    for index in range(rng.randint(1 if depth == 1 else 0, 5)):
        name = f"k{index}-{rng.randint(0, 999)}"
        kind = rng.choice(["str", "int", "lines", "json", "dir"] if depth < 4 else ["str"])
        if kind == "str":
            tree[name] = f"value-{rng.random()}"
        elif kind == "int":
            tree[name] = rng.randint(0, 10**6)
        elif kind == "lines":
            tree[name] = [f"line-{i}" for i in range(rng.randint(0, 4))]
        elif kind == "json":
            tree[name] = JsonLeaf({"n": rng.randint(0, 9)})
        else:
            tree[name] = random_tree(rng, depth + 1)
    return tree


def expected_leaf(value: MetadataNode) -> bytes:
    assert not isinstance(value, (Mapping, JsonLeaf))
    if isinstance(value, str):
        return value.encode()
    if isinstance(value, int):
        return str(value).encode()
    return "\n".join(value).encode()


def check_directory(node: Node, token: str, path: str, directory: MetadataTree) -> int:
    listing = node.get(path, token)
    assert listing.status == 200, path
    names = listing.body.decode().split("\n") if listing.body else []
    assert [name.rstrip("/") for name in names] == list(directory)
    checked = 1
    for name in names:
        child_path = path + name
        child = directory[name.rstrip("/")]
        if name.endswith("/"):
            assert isinstance(child, Mapping)
            assert node.get(child_path.rstrip("/"), token).body == node.get(child_path, token).body
            checked += check_directory(node, token, child_path, child)
            continue
        assert not isinstance(child, Mapping)
        served = node.get(child_path, token)
        assert served.status == 200, child_path
        if isinstance(child, JsonLeaf):
            assert json.loads(served.body) == child.document
        else:
            assert served.body == expected_leaf(child)
        assert node.get(child_path + "/", token).status == 404
        checked += 1
    return checked


@pytest.mark.parametrize("seed", range(20))
def test_every_listed_name_resolves_consistently(seed: int) -> None:
    rng = random.Random(seed)
    tree = {"meta-data": random_tree(rng, 1), "dynamic": random_tree(rng, 1)}
    node = Node(tree)
    assert check_directory(node, node.token(), "/latest/", tree) > 2
