"""Models-from-code entry point of the deployable model (no pickled Python object in the model).

MLflow executes this file when it loads the model; ``set_model`` names the :class:`SegmentationModel`
whose ``load_context`` rebuilds the net from the logged config and loads the ``state_dict`` with
``weights_only=True``. The ``medmtl`` package comes from the model's own ``code`` folder. MONAI is imported
without the optional packages that inference never uses (:mod:`medmtl.inference.lean_imports`).
"""

from mlflow.models import set_model

from medmtl.inference.lean_imports import import_monai_for_inference

import_monai_for_inference()  # a fresh serving process: MONAI without optional packages inference never uses

from medmtl.inference.pyfunc_model import SegmentationModel  # noqa: E402

set_model(SegmentationModel())
