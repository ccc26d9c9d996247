"""Errors of the devices package: every one names the device and says what to do, on one line."""
from __future__ import annotations

from edgepack.errors import EdgepackError

PARTIAL_EXIT = 5  # some devices of a fleet failed, others returned results


class DeviceError(EdgepackError):
    """A device problem: unreachable, refused, unsuitable, or a failed remote step."""

    def __init__(self, message: str, *, reason: str | None = None, hint: str | None = None):
        super().__init__(message, hint=hint)
        self.reason = reason or message  # the message without the "name (host:port): " prefix


class ConnectionDropped(DeviceError):
    """The SSH connection broke after it was set up (retried once by the caller)."""


def device_error(where: str, reason: str, cls: type[DeviceError] = DeviceError) -> DeviceError:
    return cls(f"{where}: {reason}", reason=reason)
