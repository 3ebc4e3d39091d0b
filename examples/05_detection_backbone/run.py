"""A detection model's ResNet backbone, converted inside the whole model: which sites the feature pyramid keeps."""

import warnings

import torch

import resnet_surgery as rs

warnings.simplefilter("ignore", rs.SurgeryNotice)
size = (3, 224, 224)
for name in ("fasterrcnn_resnet50_fpn", "retinanet_resnet50_fpn"):
    model = rs.load_model(name)  # random weights; --weights COCO_V1 loads torchvision's (FrozenBatchNorm2d trunk)
    v1 = rs.convert(model, "v1", input_size=size)  # approximate: the recipe says so
    pruned = rs.convert(v1, prune_dead=True, input_size=size)
    recipe = rs.history(pruned).recipe
    trunk = recipe.trunk
    diff, scale = rs.max_difference(v1, pruned, size)
    macs = [rs.count_macs(m.get_submodule(trunk), size) / 1e9 for m in (model, v1, pruned)]
    print(f"{name}: trunk '{trunk}' ({type(model.get_submodule(trunk)).__name__}) inside {type(model).__name__}")
    print(f"  to v1: {[r.block for r in rs.history(v1).recipe.rewrites]}, exact: {rs.history(v1).recipe.exact}")
    print(f"  --prune-dead pruned: {[r.block for r in recipe.rewrites] or 'none'}")
    for note in recipe.notices:
        print(f"  kept: {note.removeprefix('prune_dead: ')}")
    print(f"  backbone MACs at 224: v1.5 {macs[0]:.3f} G, v1 {macs[1]:.3f} G, v1 pruned {macs[2]:.3f} G; "
          f"pruned vs v1: max relative difference {diff / scale:.1g} over every pyramid level")
    with torch.no_grad():
        out = pruned.eval()([torch.rand(3, 200, 240)])[0]
    print(f"  the whole {type(pruned).__name__} still runs: {sorted(out)}\n")
