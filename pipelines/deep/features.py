"""Stage ``deep-embed``: global-average-pooled embedding and Grad-CAM map of one patch."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray

from pipelines.deep.encoders import POOL, TARGET_LAYER, family


@dataclass(frozen=True)
class Embedding:
    vector: NDArray[np.float32]
    cam: NDArray[np.float32]  # same shape as the patch, in [0, 1]
    score: float  # the head's output (what the map explains)


class DeepEmbed:
    name = "deep-embed"

    def __init__(self, net: Any, arch: str, device: str = "cpu", attention: bool = True) -> None:
        self.net = net.to(device).eval()
        self.arch, self.device, self.attention = arch, device, attention

    def run(self, patch: NDArray[np.float32]) -> Embedding:
        import torch

        x = torch.from_numpy(np.ascontiguousarray(patch))[None, None].to(self.device)
        pool = dict(self.net.named_modules())[POOL[family(self.arch)]]
        captured: dict[str, Any] = {}
        handle = pool.register_forward_hook(lambda _m, _i, out: captured.__setitem__("v", out.detach()))
        try:
            if self.attention:
                from monai.visualize.class_activation_maps import GradCAM

                cam_fn = GradCAM(nn_module=self.net, target_layers=TARGET_LAYER[family(self.arch)])
                cam = cam_fn(x, class_idx=0)
                with torch.no_grad():
                    score = self.net(x)
                cam_np = cam[0, 0].detach().cpu().numpy().astype(np.float32)
            else:
                with torch.no_grad():
                    score = self.net(x)
                cam_np = np.zeros(patch.shape, np.float32)
        finally:
            handle.remove()
        vector = captured["v"].flatten().cpu().numpy().astype(np.float32)
        return Embedding(vector, np.nan_to_num(cam_np), float(score.flatten()[0]))
