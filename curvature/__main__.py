"""``python -m curvature`` = the ``curvature`` command."""
import sys

from .cli import main

sys.exit(main())
