"""Peer protocol errors: the decoder raises only `ProtocolError` subclasses."""

from __future__ import annotations


class ProtocolError(Exception):
    """Anything wrong with a received frame; `counter` names the rejection counter."""

    counter = "protocol_error"


class FrameTooLarge(ProtocolError):
    """The length prefix announces more than the maximum frame size."""

    counter = "oversized"


class Truncated(ProtocolError):
    """The frame ended early or is too short to hold a tag."""

    counter = "truncated"


class AuthError(ProtocolError):
    """The HMAC tag does not verify under our key."""

    counter = "bad_auth"


class MalformedError(ProtocolError):
    """The authenticated body is not the expected MessagePack envelope."""

    counter = "malformed"


class VersionError(ProtocolError):
    """The envelope carries a protocol version we do not speak."""

    counter = "bad_version"


class SchemaError(ProtocolError):
    """A message body does not fit its schema."""

    counter = "bad_schema"


class ReplayError(ProtocolError):
    """Timestamp outside the window, or a nonce already seen."""

    counter = "replayed"
