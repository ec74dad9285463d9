"""Engine micro-benchmarks: they reach into `server.engine` (the LoRA ops and the fast
path) inside one process, unlike the load tests, which drive a server over HTTP.
`python -m loadtests micro engine|lora-ops [flags]`."""
