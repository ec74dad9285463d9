"""Scale-out beyond one process, without Ray: what server/ray_serve.py wires into Ray
Serve, kept apart so that it is unit-tested in-process (settings from Ray's builder args,
the application-wide quota coordinator and its client, the metrics merge)."""
