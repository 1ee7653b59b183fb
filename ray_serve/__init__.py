"""fuyao on Ray (docs/ray.md): a Ray Serve application whose replicas each own one OpenAI-compatible engine on the NPUs
Ray gave them (:mod:`fuyao.ray_serve.engine`), its OpenAI ingress (:mod:`fuyao.ray_serve.ingress`), a Serve request
router that asks fuyao's KV-cache index which replica holds a prompt's prefix (:mod:`fuyao.ray_serve.request_router`),
and the application builder that wires them (:mod:`fuyao.ray_serve.app`).

Only :mod:`fuyao.ray_serve.ranking`, :mod:`fuyao.ray_serve.settings`, :mod:`fuyao.ray_serve.child` (the engine
process), :mod:`fuyao.ray_serve.kv_lookup` (the index lookup behind its circuit breaker) and
:mod:`fuyao.ray_serve.engine_client` (the replica's calls to its engine) import without Ray: the decisions and the
I/O they wrap are tested in fuyao's own environment; the modules that subclass Serve's types run inside Ray (the Ray
image, or the venv ``hack/build-ray.sh`` makes).
"""
