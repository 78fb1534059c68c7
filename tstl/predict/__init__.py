"""Using a trained run: ``Predictor`` labels any video with ``tstl eval``'s views (``tstl
predict``), and ``export`` writes the classifier as ONNX with a sidecar (``tstl export``). See
README "Using a trained model".

``from tstl.predict import Predictor; Predictor("runs/demo").predict(["clip.webm"])``
"""

from tstl.core import torchvision_shim

torchvision_shim.install()

from tstl.predict.predictor import Prediction, Predictor, Window  # noqa: E402

__all__ = ["Prediction", "Predictor", "Window"]
