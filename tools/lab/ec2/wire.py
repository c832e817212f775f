"""The EC2 Query API on the wire: request parameters in, XML documents out.

boto3 talks to EC2 in the "ec2" protocol: a form-encoded POST of flattened parameters
(``Filter.1.Value.2=...``) answered by an XML document. Rather than hand-writing the
names of every parameter and element the emulator understands, this codec walks
botocore's own service model for EC2, the same model boto3 serializes requests and parses
responses with. The emulator therefore speaks exactly what the installed boto3 sends and
expects, and the two cannot drift apart when botocore is upgraded.

The server side sees EC2 through plain Python values shaped like boto3's: a request
decodes to the kwargs the boto3 caller passed, and a handler's result, keyed like the
dict boto3 returns, renders to the XML EC2 would answer with. Mismatches with the model
fail loudly: an unknown request parameter is EC2's ``UnknownParameter``, and a result key
the model does not know is a bug in the emulator, raised rather than dropped.

The model is large (hundreds of operations, thousands of shapes), so it is loaded once,
on first use, and each structure's name tables are built only when a request or response
first reaches it.
"""

from __future__ import annotations

import base64
import binascii
import functools
import re
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from typing import Any
from urllib.parse import parse_qsl
from xml.sax.saxutils import escape

import botocore.session
from botocore.model import ListShape, OperationModel, ServiceModel, Shape, StructureShape

__all__ = ["WireError", "decode_params", "parse_form", "render_error", "render_response"]

_XML_DECLARATION = '<?xml version="1.0" encoding="UTF-8"?>\n'

# EC2 list indices are 1-based; a leading zero is refused so that "1" and "01" cannot
# name the same element twice.
_LIST_INDEX = re.compile(r"[1-9][0-9]*")
_INTEGER = re.compile(r"[+-]?[0-9]+")


class WireError(Exception):
    """A request EC2 would refuse before looking at state; ``code`` is the EC2 error code."""

    # The same attribute the emulator's Ec2Error uses, so the API layer can treat both alike.
    status = 400

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


# -- the model ------------------------------------------------------------------------------


@functools.cache
def _service_model() -> ServiceModel:
    return botocore.session.get_session().get_service_model("ec2")


@functools.cache
def _operation_names() -> frozenset[str]:
    return frozenset(_service_model().operation_names)


def _operation(action: str) -> OperationModel:
    if action not in _operation_names():
        raise WireError("InvalidAction", f"The action {action} is not valid for this web service.")
    return _service_model().operation_model(action)


@functools.cache
def _response_namespace() -> str:
    # EC2 documents carry the trailing slash; the model's xmlNamespace does not.
    return f"http://ec2.amazonaws.com/doc/{_service_model().api_version}/"


def _query_name(member: Shape, member_name: str) -> str:
    """The name a structure member has in a request (botocore's EC2Serializer rule).

    An explicit queryName wins: a few members have one that differs from their
    locationName (RunInstances' NetworkInterface.N.PrivateIpAddresses, whose
    locationName is privateIpAddressesSet). Otherwise EC2 capitalizes the locationName.
    """
    serialization = member.serialization
    if "queryName" in serialization:
        return str(serialization["queryName"])
    if "name" in serialization:
        location_name = str(serialization["name"])
        return location_name[:1].upper() + location_name[1:]
    return member_name


def _refuse_maps_and_flattening(shape: Shape) -> None:
    # Neither occurs anywhere in the EC2 model; if a botocore upgrade introduces one, fail
    # here instead of putting untested guesses on the wire.
    if shape.type_name == "map" or shape.serialization.get("flattened"):
        raise NotImplementedError(
            f"EC2 model shape {shape.name} is a map or flattened list, which this codec "
            "does not implement"
        )
    if isinstance(shape, ListShape):
        _refuse_maps_and_flattening(shape.member)


# Keyed by structure name: a structure's member traits live in its own definition, so
# every reference to the same structure yields the same table. Building a table twice in
# a race between server threads is harmless; the second simply replaces the first.
_request_tables: dict[str, dict[str, tuple[str, Shape]]] = {}
_response_tables: dict[str, dict[str, tuple[str, str, Shape]]] = {}


def _request_table(structure: StructureShape) -> dict[str, tuple[str, Shape]]:
    """Query name -> (member name, member shape)."""
    table = _request_tables.get(structure.name)
    if table is None:
        table = {}
        for member_name, member in structure.members.items():
            _refuse_maps_and_flattening(member)
            query_name = _query_name(member, member_name)
            if query_name in table:
                raise ValueError(
                    f"EC2 model structure {structure.name}: members {table[query_name][0]} "
                    f"and {member_name} share the query name {query_name}"
                )
            table[query_name] = (member_name, member)
        _request_tables[structure.name] = table
    return table


def _response_table(structure: StructureShape) -> dict[str, tuple[str, str, Shape]]:
    """Member name -> (opening tag, closing tag, member shape), in model order."""
    table = _response_tables.get(structure.name)
    if table is None:
        table = {}
        for member_name, member in structure.members.items():
            _refuse_maps_and_flattening(member)
            tag = str(member.serialization.get("name", member_name))
            table[member_name] = (f"<{tag}>", f"</{tag}>", member)
        _response_tables[structure.name] = table
    return table


# -- requests -------------------------------------------------------------------------------


def parse_form(body: bytes, query: str = "") -> dict[str, str]:
    """Form-encoded request parameters, URL query first, so body values win on repeats."""
    try:
        pairs = parse_qsl(query, keep_blank_values=True, errors="strict")
        pairs += parse_qsl(body.decode("utf-8"), keep_blank_values=True, errors="strict")
    except UnicodeDecodeError as exc:
        raise WireError("MalformedQueryString", "The request is not valid UTF-8.") from exc
    return dict(pairs)


class _Indexed(dict[int, Any]):
    """A list being assembled from Name.N parameters, which may arrive in any order."""


def decode_params(action: str, flat: dict[str, str]) -> dict[str, Any]:
    """EC2 query parameters (without Action and Version) -> the kwargs boto3 was given.

    Keys are the model's member names and values have the model's types. An empty list
    cannot be told from an absent one: botocore sends nothing for either.
    """
    input_shape = _operation(action).input_shape
    assembled: dict[str, Any] = {}
    for key, raw in flat.items():
        if input_shape is None:
            raise _unknown(key)
        _place(assembled, input_shape, key, raw)
    params: dict[str, Any] = _finish(assembled)
    if input_shape is not None:
        for member_name in input_shape.required_members:
            if member_name not in params:
                query_name = _query_name(input_shape.members[member_name], member_name)
                raise WireError(
                    "MissingParameter", f"The request must contain the parameter {query_name}"
                )
    return params


def _unknown(key: str) -> WireError:
    return WireError("UnknownParameter", f"The parameter {key} is not recognized")


def _place(root: dict[str, Any], input_shape: StructureShape, key: str, raw: str) -> None:
    """Put one flat parameter where it belongs in the nested request being assembled."""
    container: dict[Any, Any] = root
    shape: Shape = input_shape
    segments = key.split(".")
    last = len(segments) - 1
    for position, segment in enumerate(segments):
        slot: str | int
        if isinstance(shape, StructureShape):
            found = _request_table(shape).get(segment)
            if found is None:
                raise _unknown(key)
            slot, shape = found
        elif isinstance(shape, ListShape):
            if not _LIST_INDEX.fullmatch(segment):
                raise _unknown(key)
            slot, shape = int(segment), shape.member
        else:
            # More segments after a scalar: the parameter names nothing in the model.
            raise _unknown(key)
        if position == last:
            if shape.type_name in ("structure", "list"):
                # Such as "SourceDestCheck=true" where EC2 expects SourceDestCheck.Value.
                raise _unknown(key)
            container[slot] = _decode_scalar(shape, raw, key)
        else:
            child = container.get(slot)
            if child is None:
                child = _Indexed() if shape.type_name == "list" else {}
                container[slot] = child
            container = child


def _finish(assembled: Any) -> Any:
    if isinstance(assembled, _Indexed):
        return [_finish(assembled[index]) for index in sorted(assembled)]
    if isinstance(assembled, dict):
        return {name: _finish(value) for name, value in assembled.items()}
    return assembled


def _decode_integer(raw: str) -> int:
    if not _INTEGER.fullmatch(raw):
        raise ValueError(raw)
    return int(raw)


def _decode_boolean(raw: str) -> bool:
    lowered = raw.lower()
    if lowered == "true":
        return True
    if lowered == "false":
        return False
    raise ValueError(raw)


def _decode_timestamp(raw: str) -> datetime:
    moment = datetime.fromisoformat(raw)
    if moment.tzinfo is None:
        return moment.replace(tzinfo=UTC)
    return moment.astimezone(UTC)


def _decode_blob(raw: str) -> bytes:
    try:
        return base64.b64decode(raw, validate=True)
    except binascii.Error as exc:
        raise ValueError(raw) from exc


def _decode_string(raw: str) -> str:
    return raw


_SCALAR_DECODERS: dict[str, tuple[Callable[[str], Any], str]] = {
    "string": (_decode_string, "String"),
    "character": (_decode_string, "String"),
    "integer": (_decode_integer, "Integer"),
    "long": (_decode_integer, "Long"),
    "boolean": (_decode_boolean, "Boolean"),
    "float": (float, "Float"),
    "double": (float, "Double"),
    "timestamp": (_decode_timestamp, "an ISO 8601 timestamp"),
    "blob": (_decode_blob, "base64"),
}


def _decode_scalar(shape: Shape, raw: str, key: str) -> Any:
    decoder, expected = _SCALAR_DECODERS[shape.type_name]
    try:
        return decoder(raw)
    except ValueError:
        raise WireError(
            "InvalidParameterValue",
            f"Value ({raw}) for parameter {key} is invalid. Expected: {expected}.",
        ) from None


# -- responses ------------------------------------------------------------------------------


def render_response(action: str, result: Mapping[str, Any], request_id: str) -> bytes:
    """A handler's result, keyed by output member names like boto3's, as EC2's XML answer.

    Members missing from ``result`` or None are left out; naive datetimes are taken as
    UTC. A key the output shape does not have is an emulator bug and raises ValueError; a
    value of the wrong type (a str count, an int flag) raises TypeError. Both name the path.
    """
    output_shape = _operation(action).output_shape
    parts = [
        _XML_DECLARATION,
        f'<{action}Response xmlns="{_response_namespace()}">',
        f"<requestId>{escape(request_id)}</requestId>",
    ]
    if output_shape is None:
        if result:
            raise ValueError(f"{action} has no output members, yet its result has {sorted(result)}")
    else:
        _render_structure(parts, output_shape, result, action)
    parts.append(f"</{action}Response>")
    return "".join(parts).encode()


def render_error(code: str, message: str, request_id: str) -> bytes:
    """EC2's error document, which boto3 turns into ClientError with this code and message."""
    return (
        f"{_XML_DECLARATION}<Response><Errors><Error><Code>{escape(code)}</Code>"
        f"<Message>{escape(message)}</Message></Error></Errors>"
        f"<RequestID>{escape(request_id)}</RequestID></Response>"
    ).encode()


def _render_structure(parts: list[str], structure: StructureShape, value: Any, path: str) -> None:
    if not isinstance(value, Mapping):
        raise TypeError(f"{path}: expected a mapping for {structure.name}, got {value!r}")
    table = _response_table(structure)
    strangers = [key for key in value if key not in table]
    if strangers:
        raise ValueError(
            f"{path}: unknown member(s) {', '.join(map(repr, strangers))} for EC2 shape "
            f"{structure.name}, whose members are {', '.join(table)}"
        )
    # Model order, so the document does not depend on how a handler built its dict.
    for member_name, (opening, closing, member) in table.items():
        member_value = value.get(member_name)
        if member_value is None:
            continue
        parts.append(opening)
        _render_value(parts, member, member_value, f"{path}.{member_name}")
        parts.append(closing)


def _render_list(parts: list[str], shape: ListShape, value: Any, path: str) -> None:
    if not isinstance(value, list | tuple):
        raise TypeError(f"{path}: expected a list for {shape.name}, got {value!r}")
    element = shape.member
    tag = element.serialization.get("name", "item")
    opening, closing = f"<{tag}>", f"</{tag}>"
    for index, item in enumerate(value):
        if item is None:
            raise TypeError(f"{path}[{index}]: None in a list")
        parts.append(opening)
        _render_value(parts, element, item, f"{path}[{index}]")
        parts.append(closing)


def _render_value(parts: list[str], shape: Shape, value: Any, path: str) -> None:
    if isinstance(shape, StructureShape):
        _render_structure(parts, shape, value, path)
    elif isinstance(shape, ListShape):
        _render_list(parts, shape, value, path)
    else:
        encoder = _SCALAR_ENCODERS[shape.type_name]
        text = encoder(value)
        if text is None:
            raise TypeError(f"{path}: {value!r} is not a valid {shape.type_name}")
        parts.append(text)


def _encode_string(value: Any) -> str | None:
    return escape(value) if isinstance(value, str) else None


def _encode_integer(value: Any) -> str | None:
    # bool is an int subclass; True where a count belongs is a bug, not a 1.
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    return None


def _encode_boolean(value: Any) -> str | None:
    if isinstance(value, bool):
        return "true" if value else "false"
    return None


def _encode_float(value: Any) -> str | None:
    if isinstance(value, int | float) and not isinstance(value, bool):
        # repr is the shortest text that reads back as the same float.
        return repr(float(value)) if isinstance(value, float) else str(value)
    return None


def _encode_timestamp(value: Any) -> str | None:
    if not isinstance(value, datetime):
        return None
    moment = value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)
    # EC2 answers in milliseconds; finer values keep their microseconds so nothing is lost.
    fraction = moment.microsecond
    digits = f"{fraction // 1000:03d}" if fraction % 1000 == 0 else f"{fraction:06d}"
    return f"{moment:%Y-%m-%dT%H:%M:%S}.{digits}Z"


def _encode_blob(value: Any) -> str | None:
    if isinstance(value, bytes | bytearray):
        return base64.b64encode(value).decode("ascii")
    return None


_SCALAR_ENCODERS: dict[str, Callable[[Any], str | None]] = {
    "string": _encode_string,
    "character": _encode_string,
    "integer": _encode_integer,
    "long": _encode_integer,
    "boolean": _encode_boolean,
    "float": _encode_float,
    "double": _encode_float,
    "timestamp": _encode_timestamp,
    "blob": _encode_blob,
}
