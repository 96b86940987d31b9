"""Exceptions that carry a one-line message meant for the operator.

Domain code raises these (or plain ``OSError``); the CLI prints the message
as one line and exits non-zero, the FUSE edge translates ``OSError`` to an
errno. Nothing else catches them.
"""

from __future__ import annotations


class FusediskError(Exception):
    """An error whose ``str()`` is a complete, one-line explanation."""


class ConfigError(FusediskError):
    """The configuration (file or flags) is not usable."""


class StateError(FusediskError):
    """The state directory is missing, locked, corrupt or from a newer version."""


class OwnershipError(FusediskError):
    """A store belongs to another datastore (served by its daemon, or claimed by its state)."""


class MountError(FusediskError):
    """The mountpoint cannot be used, or the mount did not come up."""


class ControlError(FusediskError):
    """The daemon could not be reached, or refused a control request."""
