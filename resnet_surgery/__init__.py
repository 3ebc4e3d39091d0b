"""resnet-surgery: turn a pretrained ResNet into another downsampling variant and prove what that did."""

from .errors import NotExactError, SurgeryError, TraceError

__all__ = ["SurgeryError", "NotExactError", "TraceError"]
