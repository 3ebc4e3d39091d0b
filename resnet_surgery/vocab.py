"""One vocabulary for variants, stride placement, shortcuts and rewrites: string enums a typo cannot slip past.

Every member is a ``str`` (``Variant.V1 == "v1"``), so recipes, JSON reports and command-line choices
keep their plain strings while the code compares against named constants.
"""

from __future__ import annotations

from enum import Enum

__all__ = [
    "BlockKind", "Layout", "Op", "PROJECTIONS", "Shortcut", "TARGET_SHORTCUTS", "TARGET_VARIANTS",
    "Variant",
]


class _Name(str, Enum):
    """A string constant that prints and formats as its value on every Python version."""

    def __str__(self) -> str:
        return self.value

    def __format__(self, spec: str) -> str:
        return format(self.value, spec)

    def __repr__(self) -> str:
        return repr(self.value)  # lists and tuples of them print like the plain strings they replace

    @classmethod
    def values(cls) -> tuple[str, ...]:
        return tuple(m.value for m in cls)


class Variant(_Name):
    """A whole model's downsampling design."""

    V1 = "v1"  # stride on the first 1x1
    V1_5 = "v1.5"  # stride on the 3x3
    D = "d"  # v1.5 with an avgpool shortcut
    MIXED = "mixed"  # blocks disagree (only ever reported, never a target)


TARGET_VARIANTS = (Variant.V1, Variant.V1_5, Variant.D)


class Layout(_Name):
    """Where one downsampling block's stride sits."""

    V1 = "v1"  # first 1x1
    V1_5 = "v1.5"  # 3x3
    V1_5_DILATED = "v1.5-dilated"  # 3x3 with dilation 2 and padding 2: the exact form of v1
    DILATED = "dilated"  # stride 1, dilation in its place (replace_stride_with_dilation): nothing to move
    NOT_APPLICABLE = "n/a"  # no 1x1 on the main path (BasicBlock)
    OTHER = "other"  # not recognised

    @property
    def stride_on(self) -> str:
        """The conv that holds the stride, as `inspect` prints it."""
        return {Layout.V1: "1x1", Layout.V1_5: "3x3", Layout.V1_5_DILATED: "3x3-dilated"}.get(self, self.value)


class Shortcut(_Name):
    """What a residual block's shortcut branch is."""

    IDENTITY = "identity"
    CONV1X1 = "conv1x1"
    AVGPOOL = "avgpool"  # AvgPool2d then a 1x1 stride-1 conv (ResNet-D)
    CONV3X3 = "conv3x3"  # a 3x3 stride-2 conv (its centre tap can hold a 1x1)
    SUBSAMPLE = "subsample"  # resnet_surgery.Subsample, inserted by prune_dead
    OTHER = "other"


TARGET_SHORTCUTS = (Shortcut.AVGPOOL, Shortcut.CONV1X1, Shortcut.CONV3X3)
PROJECTIONS = (Shortcut.CONV1X1, Shortcut.CONV3X3)


class BlockKind(_Name):
    """What a residual block is: a bottleneck (1x1, 3x3, 1x1), a basic block (3x3, 3x3) or other."""

    BOTTLENECK = "bottleneck"
    BASIC = "basic"
    OTHER = "other"


class Op(_Name):
    """One rewrite recorded in a recipe."""

    STRIDE_TO_1X1 = "stride_to_1x1"
    STRIDE_TO_3X3 = "stride_to_3x3"
    STRIDE_TO_3X3_DILATED = "stride_to_3x3_dilated"
    SHORTCUT_AVGPOOL = "shortcut_avgpool"
    SHORTCUT_CONV1X1 = "shortcut_conv1x1"
    SHORTCUT_CONV3X3 = "shortcut_conv3x3"
    PRUNE_DEAD = "prune_dead"

    @classmethod
    def shortcut_to(cls, target: Shortcut) -> Op:
        return cls(f"shortcut_{target.value}")
