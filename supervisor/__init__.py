"""ca-supervisor: warm, supervised worker pools behind one CA port."""

import os as _os

# pydantic scans every installed distribution's entry points for plugins at
# import (~15 ms of each process's start); the supervisor uses none.
_os.environ.setdefault("PYDANTIC_DISABLE_PLUGINS", "__all__")
