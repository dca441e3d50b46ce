"""The service on Ray's own components: the learned-TTA inference endpoint (Ray Serve) lives in `serve.py`."""
