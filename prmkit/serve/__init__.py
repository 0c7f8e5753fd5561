"""`prmkit serve`: a PRM's step scores over HTTP, and adapters for the RL and search code that asks for them.

- :mod:`prmkit.serve.app`: the FastAPI application; :mod:`prmkit.serve.runner`: uvicorn with a drain on SIGTERM.
- :mod:`prmkit.serve.batcher`: concurrent requests batched into the engine (:class:`prmkit.scoring.StepScorer`).
- :mod:`prmkit.serve.endpoints`: /v1/score, OpenRLHF's /get_reward, vLLM's /pooling; :mod:`prmkit.serve.schemas`:
  reading requests; :mod:`prmkit.serve.policy`: steps cut from a response and one reward per solution;
  :mod:`prmkit.serve.metrics`: Prometheus.
- :mod:`prmkit.serve.adapters`: TRL's GRPO reward function, verl's ``compute_score``, a search-and-learn PRM, in
  process or against a server's URL.

The server needs the serve extra (``pip install 'prmkit[serve]'``); the policy and the in-process adapters do not.
"""
