"""Models by name: torchvision and timm builders, weights files, and the CIFAR-10 ResNets that ship with the package."""
