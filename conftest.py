"""Collection rules for the whole repository (pytest's doctests of fastbn/ included)."""

import importlib.util

# fastbn.torch is the one module that needs an optional package to import at all: without
# torch its doctests are not collected (tests/test_torch.py skips itself).
collect_ignore = [] if importlib.util.find_spec("torch") else ["fastbn/torch.py"]
