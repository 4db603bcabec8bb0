"""``python -m offloadd.nfs``: see main.py."""
import sys

from .main import main

sys.exit(main())
