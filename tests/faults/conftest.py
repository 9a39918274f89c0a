"""The fault suite (see README.md here); its helpers live in ``fault_helpers.py``.

The tracking tests' server machinery (``tracking_helpers``) is put on ``sys.path`` for faults that need a server.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tracking"))
