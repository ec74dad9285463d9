"""Scale-out beyond one process: the Ray Serve application and the parts it wires.

Only `ray_serve` imports Ray; the rest is Ray-free so that it is unit-tested in-process:
`ingress` (admission at the edge), `placement` (routing key, residency, in-process ASGI
call), `coordinator` (the application-wide quota state and its client), `config` (settings
from Ray's builder args) and `metrics_merge` (one /metrics for all replicas)."""
