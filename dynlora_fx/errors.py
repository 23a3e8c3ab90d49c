"""The one exception type users see.

Every error a user can cause is a :class:`DynLoRAError` whose message names the
model part, the cause and the remedy. Internal bugs stay ordinary exceptions.
"""

from __future__ import annotations

__all__ = ["DynLoRAError", "CaptureError", "ConfigError", "TargetError", "MergeError", "StateError"]


class DynLoRAError(Exception):
    """A problem with what the user passed in; the message says what to do about it."""

    def __init__(self, part: str, cause: str, remedy: str):
        self.part, self.cause, self.remedy = part, cause, remedy
        super().__init__(f"{part}: {cause}. Remedy: {remedy}")


class CaptureError(DynLoRAError):
    """Neither torch.fx nor torch.export could capture the model."""


class ConfigError(DynLoRAError):
    """A config field or runtime argument has an illegal value."""


class TargetError(DynLoRAError):
    """Target patterns are wrong, or nothing in the model can carry an adapter."""


class MergeError(DynLoRAError):
    """Folding adapters into their weights would corrupt the model."""


class StateError(DynLoRAError):
    """A state dict or module does not fit what it is loaded into / used with."""
