"""Plain LoRA: adapters trained, ``W`` frozen at its initial value, nothing around the step."""

from __future__ import annotations

from .handler import MethodHandler

__all__ = ["LoRAHandler"]


class LoRAHandler(MethodHandler):
    """LoRA needs no runtime: the default handler's no-ops, any AdamW."""
