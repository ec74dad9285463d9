"""Deprecated: moved to server/scaleout/ray_serve.py.

`server.ray_serve:app_builder` keeps working for deployment files written before the
move (`serve run`, a `serve` config's `import_path`, a KubeRay RayService).
"""

from server.moved import forward_to

__getattr__ = forward_to("server.scaleout.ray_serve", __name__)
