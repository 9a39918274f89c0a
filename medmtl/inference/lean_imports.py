"""Import MONAI for inference without the optional packages that inference never touches.

``import monai`` imports every MONAI submodule (``monai/__init__.py`` runs ``load_submodules`` over the
whole package; MONAI 1.6 has no switch to turn that off) and, through MONAI's ``optional_import``, every
optional package that happens to be installed. In medmtl's environment that is scipy, matplotlib, OpenCV,
scikit-learn, scikit-image and Optuna: measured on the 2-core machine (``python -X importtime``, torch,
mlflow and pandas already imported), MONAI's own modules took 0.4 s of the 3.5 s that ``import monai``
cost, the optional packages the rest (scipy 1.5 s, matplotlib 0.5 s, OpenCV 0.4 s, scikit-learn 0.2 s).

MONAI's optional-import contract is that a package which cannot be imported is recorded as missing, and
only a feature that needs it raises ``OptionalImportError`` when it is used. :func:`import_monai_for_inference`
relies on exactly that: while MONAI is being imported, the packages in :data:`SKIPPED` cannot be
imported (``None`` in ``sys.modules``); afterwards they are importable again for any other code. The
inference chain (``LoadImage`` with nibabel, ``Orientation``, ``Spacing`` with bilinear/nearest modes on
torch, ``EnsureType``, ``Invertd``, ``sliding_window_inference``) uses none of them; what would (scipy
spline orders in ``Spacing``, MONAI's plotting helpers) is not configured on this path, and would raise
MONAI's clear ``OptionalImportError`` rather than compute something different. ``benchmarks/predict.py``
checks that the labels are identical with and without it.

Only the ``medmtl predict`` command and the served model's entry point call this, and only when MONAI is
not imported yet; in any other process (training, tests, notebooks) MONAI is imported as usual.
"""

from __future__ import annotations

import sys

__all__ = ["SKIPPED", "SCIPY_SUBPACKAGES", "import_monai_for_inference"]

# optional packages that MONAI would import and the inference path never uses; scipy's subpackages by name,
# because scipy itself is often imported already (its top level is cheap, the subpackages are not)
SCIPY_SUBPACKAGES = ("constants", "fft", "integrate", "interpolate", "linalg", "ndimage", "optimize", "signal", "sparse",
                     "spatial", "special", "stats")
SKIPPED = ("scipy", *(f"scipy.{name}" for name in SCIPY_SUBPACKAGES), "matplotlib", "cv2", "sklearn", "skimage", "optuna")


def import_monai_for_inference() -> bool:
    """Import ``monai.transforms`` and ``monai.inferers`` with :data:`SKIPPED` unimportable meanwhile.

    Returns ``True`` when it did so, ``False`` when MONAI was already imported (nothing changes then).
    A skipped package that something else imported before is left alone (MONAI then sees it as usual).
    """
    if "monai" in sys.modules:
        return False
    blocked = [name for name in SKIPPED if name not in sys.modules]
    for name in blocked:
        sys.modules[name] = None  # type: ignore[assignment]  # "import name" raises ImportError
    try:
        import monai.inferers  # noqa: F401
        import monai.transforms  # noqa: F401
    finally:
        for name in blocked:
            if sys.modules.get(name, 0) is None:
                del sys.modules[name]
    return True
