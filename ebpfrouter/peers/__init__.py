"""Daemon-to-daemon protocol: authenticated MessagePack frames over TCP (see DESIGN.md)."""

from .errors import (
    AuthError,
    FrameTooLarge,
    MalformedError,
    ProtocolError,
    ReplayError,
    SchemaError,
    Truncated,
    VersionError,
)
from .messages import MESSAGE_TYPES, PROTOCOL_VERSION, SCHEMAS, Message, check_body
from .wire import MAX_FRAME, Codec, FrameBuffer, ReplayGuard

__all__ = [
    "MAX_FRAME", "MESSAGE_TYPES", "PROTOCOL_VERSION", "SCHEMAS", "AuthError", "Codec",
    "FrameBuffer", "FrameTooLarge", "MalformedError", "Message", "ProtocolError", "ReplayError",
    "ReplayGuard", "SchemaError", "Truncated", "VersionError", "check_body",
]
