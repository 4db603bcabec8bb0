"""No fixtures here (they are all in tests/conftest.py): the names test_nfsfuse.py imports as
``.conftest``, until its import line names the harness."""
from ..harness import CONVERT, wait_for  # noqa: F401 (test_nfsfuse.py imports them from here)
