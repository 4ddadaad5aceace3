"""Make ``import torchvision`` work when its native library does not match torch.

PyPI's torchvision 0.28.0 is a CUDA build. Next to the CPU build of torch its ``_C.so`` cannot
load, and the first ``import torchvision`` (pulled in by timm, open_clip, lightning and
torchmetrics) fails with "operator torchvision::nms does not exist". Declaring the two op
schemas that torchvision's Python code registers fake kernels for is enough for its pure-Python
parts (transforms) to import. Where the native library loads, this does nothing else.
"""

import importlib.util
import os


def apply() -> None:
    spec = importlib.util.find_spec("torchvision")
    if spec is None or spec.origin is None:
        return
    import torch

    native = os.path.join(os.path.dirname(spec.origin), "_C.so")
    try:
        torch.ops.load_library(native)
        return
    except (OSError, RuntimeError):
        pass
    if hasattr(torch.ops.torchvision, "nms"):
        return  # declared already in this process
    lib = torch.library.Library("torchvision", "FRAGMENT")
    lib.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    lib.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    # The Library object owns the registrations: keep it alive for the process.
    globals()["_library"] = lib
