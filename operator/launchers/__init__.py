"""Launchers of the processes the project runs on one machine, each on 127.0.0.1:
the generic child process (`process`), the pulsar-lite broker, redis-server, Prometheus
and TorchServe. Local mode, the tests and the benchmarks start their parts through them.

They import the operator's renderers (TorchServe's configuration) but no data-plane
package: what a launched process runs is its own business.
"""
