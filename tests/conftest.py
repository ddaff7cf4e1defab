"""Shared pytest configuration; fixtures live in tests/fixtures/."""

import signal
import sys

pytest_plugins = ["tests.fixtures.pg", "tests.fixtures.storage", "tests.fixtures.kloset"]

# A suite started with SIGINT ignored (`nohup make test &` from a script) would
# pass that on to every child: Python installs no SIGINT handler when it starts
# ignored, so the interrupt and clean-up tests would fail for the wrong reason.
# A handler here resets to the default in every child at exec.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    print("pgkloset tests: SIGINT was ignored at start; restoring the default handler",
          file=sys.stderr)
    signal.signal(signal.SIGINT, signal.default_int_handler)
