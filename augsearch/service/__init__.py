"""The service on Ray's own components: search jobs (Ray Jobs), the inference endpoint (Ray Serve), the run report."""
