"""The two imaging modalities medmtl trains on, defined once.

``Modality`` is the lower-case name used in configs, manifests, model inputs and metric keys
(``"ct"``, ``"mr"``); :func:`dicom_modality` gives the DICOM ``Modality`` attribute value (``"CT"``,
``"MR"``) where a file or manifest entry carries that spelling.
"""

from __future__ import annotations

from typing import Literal, get_args

__all__ = ["Modality", "MODALITIES", "dicom_modality", "parse_modality"]

Modality = Literal["ct", "mr"]
#: every modality, in the fixed order of columns, heads, batches and logged metrics
MODALITIES: tuple[Modality, ...] = get_args(Modality)


def dicom_modality(modality: Modality) -> str:
    """DICOM ``Modality`` value of a modality (``"ct"`` -> ``"CT"``)."""
    return modality.upper()


def parse_modality(value: object) -> Modality | None:
    """The modality a user or a header wrote in either spelling (``"CT"``, ``" mr "``), or None when it is none of them."""
    m = str(value or "").strip().lower()
    return m if m in MODALITIES else None
