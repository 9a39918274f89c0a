"""medmtl: joint CT and MRI segmentation with soft and learned parameter sharing.

The library is organised by pipeline stage (see ARCHITECTURE.md): ``data`` (synthetic exports,
ingest, manifest, plan, transforms, loaders), ``models`` (columns, two-column net), ``sharing``
(one module per mechanism), ``weighting`` (one module per loss-weighting method), ``training``,
``evaluation`` and ``tracking`` (MLflow), with ``config`` at the bottom and ``cli`` on top.
"""

__version__ = "0.1.0"
