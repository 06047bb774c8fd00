"""``devrep`` (the CLI) with Python's cyclic garbage collector off (test_field_memory): memory the server still
holds after a session ends is then really held, not merely waiting for a collection.

``python serve_without_gc.py serve --socket PATH ...``: exactly ``devrep serve --socket PATH ...``.
"""

from __future__ import annotations

import gc
import sys

gc.disable()

from devrep.cli import main  # noqa: E402  (imported with the collector already off, as everything it loads)

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
