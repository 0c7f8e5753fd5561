"""Process rewards where RL and search code asks for them, from a model in this process or a `prmkit serve` URL.

- :mod:`prmkit.serve.adapters.trl`: :func:`~prmkit.serve.adapters.trl.reward_function` for TRL's ``GRPOTrainer``.
- :mod:`prmkit.serve.adapters.verl`: :func:`~prmkit.serve.adapters.verl.compute_score_fn` for verl, and step rewards
  at step-end tokens for dense ``rm_scores``.
- :mod:`prmkit.serve.adapters.search_and_learn`: :class:`~prmkit.serve.adapters.search_and_learn.PRM` for
  search-and-learn's Best-of-N, beam search and DVTS.

They share :mod:`prmkit.serve.adapters.backend` and the server's policy (:mod:`prmkit.serve.policy`), so a reward is
the same in process and over HTTP. None of them needs the serve extra.
"""
