"""MONAI encoders (ResNet and SE-ResNet families), weights from local files only.

Weights are a safetensors file (preferred) or a torch state dict read with
``torch.load(..., weights_only=True)``; loading is strict (every key must match), and without
weights nothing is built: random weights never produce features in production.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

ARCHES = ("resnet10", "resnet18", "resnet34", "resnet50", "seresnet50")
# Last convolutional block (Grad-CAM target) and the pooling module (embedding) per family.
TARGET_LAYER = {"resnet": "layer4", "seresnet": "layer4"}
POOL = {"resnet": "avgpool", "seresnet": "adaptive_avg_pool"}


def family(arch: str) -> str:
    return "seresnet" if arch.startswith("seresnet") else "resnet"


def build(arch: str, dims: int, num_classes: int = 1) -> torch.nn.Module:
    """The network with a ``num_classes`` head (the head is what Grad-CAM explains)."""
    from monai.networks import nets

    if arch not in ARCHES:
        raise ValueError(f"encoder {arch!r}: expected one of {ARCHES}")
    if dims not in (2, 3):
        raise ValueError(f"dims {dims}: expected 2 or 3")
    if arch == "seresnet50":
        from monai.networks.nets.senet import SEResNet50

        net: torch.nn.Module = SEResNet50(spatial_dims=dims, in_channels=1, num_classes=num_classes)
    else:
        net = getattr(nets, arch)(spatial_dims=dims, n_input_channels=1, num_classes=num_classes)
    return net


def load_weights(net: torch.nn.Module, path: Path) -> None:
    """Strictly load a safetensors file or a weights-only state dict; nothing else is accepted."""
    import torch

    if not path.is_file():
        raise FileNotFoundError(f"model weights not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state: dict[str, Any] = load_file(str(path))
    else:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(loaded, dict):
            raise ValueError(f"{path}: not a state dict")
        state = loaded
    own = net.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    wrong = [k for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or wrong:
        raise ValueError(f"{path}: weights do not fit the network (missing {missing[:3]}, unexpected {unexpected[:3]}, "
                         f"shape mismatch {wrong[:3]})")
    net.load_state_dict(state, strict=True)


def save_weights(net: torch.nn.Module, path: Path) -> None:
    from safetensors.torch import save_file

    save_file({k: v.detach().contiguous().cpu() for k, v in net.state_dict().items()}, str(path))
