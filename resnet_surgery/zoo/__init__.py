"""Models by name: the table of families (torchvision, timm, the project's CIFAR-10 models and trained ResNet-50), safe weights files.

Code outside this package imports from here, not from its modules."""


from .cifar import (
    CIFAR_MODELS,
    DEFAULT_BLOCKS,
    DEFAULT_STEM_WIDTH,
    DEFAULT_WIDTHS,
    LAYOUTS,
    WEIGHTS_DIR,
    CifarResNet,
    cifar_resnet,
    load_cifar_resnet,
    weights_path,
)
from .judge import (
    JUDGE_ARCHS,
    JUDGE_FILE,
    JUDGE_NAME,
    STANDIN,
    build_judge,
    judge_info,
    judge_path,
    load_judge,
)
from .registry import (
    DETECTION_CLASSES,
    DETECTION_MODELS,
    FAMILIES,
    FROZEN_BN_MODELS,
    SEGMENTATION_MODELS,
    TORCHVISION_MODELS,
    build_torchvision,
    classifier_only,
    exportable_part,
    load_named,
    load_timm,
    load_torchvision,
    load_zoo,
)
from .weights import (
    WEIGHT_FILE_SUFFIXES,
    check_cached_hash,
    file_sha256,
    load_state_into,
    non_finite,
    read_state_dict,
    torch_load,
)

__all__ = [
    "CIFAR_MODELS", "CifarResNet", "DEFAULT_BLOCKS", "DEFAULT_STEM_WIDTH", "DEFAULT_WIDTHS", "DETECTION_CLASSES",
    "DETECTION_MODELS", "FAMILIES", "FROZEN_BN_MODELS", "JUDGE_ARCHS", "JUDGE_FILE", "JUDGE_NAME", "LAYOUTS",
    "SEGMENTATION_MODELS", "STANDIN", "TORCHVISION_MODELS", "WEIGHTS_DIR", "WEIGHT_FILE_SUFFIXES", "build_judge",
    "build_torchvision", "check_cached_hash", "cifar_resnet", "classifier_only", "exportable_part", "file_sha256",
    "judge_info", "judge_path", "load_cifar_resnet", "load_judge", "load_named", "load_state_into", "load_timm",
    "load_torchvision", "load_zoo", "non_finite", "read_state_dict", "torch_load", "weights_path",
]
