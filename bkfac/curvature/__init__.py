"""K-factor capture (hooks) for Linear and Conv2d layers."""

from .capture import KFactorCapture, LayerCapture, supported_reason

__all__ = ["KFactorCapture", "LayerCapture", "supported_reason"]
