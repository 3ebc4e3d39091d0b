"""Inspect a torchvision ResNet-50, convert it to v1, back to v1.5 exactly, and prune v1's dead compute."""

import warnings

import torchvision

import resnet_surgery as rs

warnings.simplefilter("ignore", rs.SurgeryNotice)  # the recipe records the notices; print them below
model = torchvision.models.resnet50().eval()
print(rs.inspect(model).variant, f"{rs.count_macs(model) / 1e9:.3f} GMACs")

v1 = rs.convert(model, "v1")
print("v1:", rs.history(v1).recipe.notices[-1])
print(f"v1: {rs.count_macs(v1) / 1e9:.3f} GMACs, dead: {rs.inspect(v1).dead_macs / 1e9:.3f} GMACs")

exact = rs.convert(v1, "v1.5", exact=True)
diff, scale = rs.max_difference(v1, exact, (3, 57, 57))
print(f"exact v1.5 (dilated) vs v1 at 57x57: max |diff| {diff:.2g} of max |logit| {scale:.3g}")

pruned = rs.convert(v1, prune_dead=True)
diff, scale = rs.max_difference(v1, pruned, (3, 224, 224))
print(f"pruned v1: {rs.count_macs(pruned) / 1e9:.3f} GMACs, max |diff| vs v1 {diff:.2g} of {scale:.3g}")
