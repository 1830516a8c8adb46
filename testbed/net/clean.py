from testbed.net.cleanup import main  # noqa: F401  (the `testbed clean` entry point lives in cleanup)
