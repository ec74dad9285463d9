"""Deprecated: moved to server/scaleout/ingress.py."""

from server.moved import forward_to

__getattr__ = forward_to("server.scaleout.ingress", __name__)
