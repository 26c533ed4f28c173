import os
import sys

# Without a GPU, Triton kernels run through Triton's interpreter. The variable must be set before anything imports
# triton (torch and transformers may), so it is set here, before any test module is collected.
if "TRITON_INTERPRET" not in os.environ and not os.path.exists("/dev/nvidia0"):
    os.environ["TRITON_INTERPRET"] = "1"

# Tests import their shared builders (tests/fixtures_*.py) as plain modules.
sys.path.insert(0, os.path.dirname(__file__))
