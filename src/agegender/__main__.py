"""`python -m agegender`: the `agegender` command."""

import sys

from agegender.apps.cli import main

sys.exit(main())
