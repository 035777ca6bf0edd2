"""``python -m captum_chefer``: see :mod:`captum_chefer.cli`."""

import sys

from .cli import main

sys.exit(main())
