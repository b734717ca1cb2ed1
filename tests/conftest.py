"""Settings shared by every test."""

import os

# The run store is off in tests. Many of them check what a run does when its
# referee trains, times out or is stopped, and a referee stored by an earlier test
# would hide that. tests/test_speed_paths.py turns the store on where it tests it.
os.environ["PARITY_CACHE_DIR"] = ""
