"""Deprecated: moved to server/scaleout/placement.py."""

from server.moved import forward_to

__getattr__ = forward_to("server.scaleout.placement", __name__)
