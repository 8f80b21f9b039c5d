"""Kubernetes I/O: server-side apply, status, events, scale, over the official client."""
