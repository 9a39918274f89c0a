"""Inference: the sliding-window :class:`~medmtl.inference.segmenter.Segmenter`, model inputs and outputs
(NIfTI, DICOM series in; NIfTI and DICOM SEG out: :mod:`~medmtl.inference.model_io`), and the deployable
MLflow pyfunc model (:mod:`~medmtl.inference.pyfunc_model`, loaded through ``pyfunc_entry.py``)."""
