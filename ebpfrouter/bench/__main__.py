"""`python3 -m ebpfrouter.bench ...`: the same as `ebpf-router bench ...`."""

import sys

from .cli import main

sys.exit(main())
