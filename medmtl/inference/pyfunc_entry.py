"""Models-from-code entry point of the deployable model (no pickled Python object in the model).

MLflow executes this file when it loads the model; ``set_model`` names the :class:`SegmentationModel`
whose ``load_context`` rebuilds the net from the logged config and loads the ``state_dict`` with
``weights_only=True``. The ``medmtl`` package comes from the model's own ``code`` folder.
"""

from mlflow.models import set_model

from medmtl.inference.pyfunc_model import SegmentationModel

set_model(SegmentationModel())
