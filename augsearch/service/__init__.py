"""The service on Ray's own components: the learned-TTA inference endpoint (Ray Serve) lives in `serve.py`."""

import os

# The service starts its own local Ray; Ray keeps every server of it on 127.0.0.1 only when this is set before ray
# is imported (by serve.py, right after this).
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
