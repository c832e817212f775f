"""``python -m cni``: the ``ultranet-cni`` command (``install``)."""

import sys

from cni.install import main

sys.exit(main())
