"""The old name of ``verified_cache`` (the record of shards verified in full, kept outside the
store; the checks themselves are in ``verify``). Importing it gives that very module, so setting
an attribute here (a test's monkeypatch) sets it there."""

import sys

from . import verified_cache

sys.modules[__name__] = verified_cache
