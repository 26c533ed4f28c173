import os
import sys

# Tests import their shared builders (tests/fixtures_*.py) as plain modules.
sys.path.insert(0, os.path.dirname(__file__))
