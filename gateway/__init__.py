"""The gateway: the only service clients call.

A request walks through the modules in this order, which is also a good order to
read them in:

- `routing`      the routing the operator writes (versions, weights, topics),
                 applied whenever it changes; from a file polled in local mode,
- `routing_configmap`  or, in a cluster, from its ConfigMap watched through the
                 Kubernetes API;
- `recsys_contracts.variant_assignment`  which variant (stable or canary) a user
                 is sticky to (shared with the analysis and simulations);
- `upstream`     the call to TorchServe, with the routing's timeout;
- `fallback`     popular items to answer with when serving fails;
- `attribution`  request ids that carry the variant and model version, so a click
                 is attributed to the version that served it without shared state;
- `events`       the impression and interaction events sent to Pulsar;
- `event_sink`   a bounded buffer and a background sender, so Pulsar never slows a
                 response down and every lost event is counted;
- `metrics`      the Prometheus metrics of one gateway instance;
- `log_rate_limit` logging that stays readable when something fails constantly;
- `api_models`   request and response bodies (pydantic), the single source of
                 both validation and the OpenAPI document (`openapi`);
- `app`          the route handlers that tie these together;
- `http_server`  a lean HTTP/1.1 server (httptools on uvloop) for those routes;
- `http_pool`    the keep-alive client pool for the model-server calls;
- `server`       running it: in the foreground, or on its own loop in a thread;
- `cli`          `recsys gateway run` (also `python -m gateway run`).
"""
