import sys
from pathlib import Path

# System tests import their harness and test models from tests/system.
sys.path.insert(0, str(Path(__file__).resolve().parent / "system"))
