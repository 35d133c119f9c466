"""The models' tiny Hugging Face checkpoints (``tests/models/conftest.py``), importable here
as ``tiny_hf_models`` (the name ``conftest`` is the top-level one's)."""

import importlib.util
import sys
from pathlib import Path

if "tiny_hf_models" not in sys.modules:
    _spec = importlib.util.spec_from_file_location("tiny_hf_models",
                                                   Path(__file__).resolve().parents[1] / "models" / "conftest.py")
    _mod = importlib.util.module_from_spec(_spec)
    sys.modules["tiny_hf_models"] = _mod
    _spec.loader.exec_module(_mod)
