import os
import sys

# Without a GPU, Triton kernels run through Triton's interpreter. The variable must be set before anything imports
# triton (torch and transformers may), so it is set here, before any test module is collected.
if "TRITON_INTERPRET" not in os.environ and not os.path.exists("/dev/nvidia0"):
    os.environ["TRITON_INTERPRET"] = "1"

# One math thread per process unless the caller says otherwise: many tests start rank processes or kiln commands
# beside the test process, and on a 2-core machine each of them taking every core made the suite slower (the
# Baichuan README replay: 119 s with torch's default threads, 51 s with one). Set before torch is imported.
os.environ.setdefault("OMP_NUM_THREADS", "1")

# Tests import their shared builders (tests/fixtures_*.py) as plain modules.
sys.path.insert(0, os.path.dirname(__file__))


def pytest_runtest_logreport(report):
    """With KILN_REPORT_FAILURES_AT_ONCE=1 (benchmarks/gpu_tests.sh), a failure's traceback is printed when the test
    ends, not in pytest's summary: a GPU file stopped by its time limit still says why its failed tests failed."""
    if report.failed and os.environ.get("KILN_REPORT_FAILURES_AT_ONCE") == "1":
        sys.stderr.write(f"\n---- {report.nodeid} failed ({report.when}):\n{report.longreprtext}\n----\n")
