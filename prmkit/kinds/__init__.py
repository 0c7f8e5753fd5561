"""PRM kinds: how each published kind of process reward model reads a step's score.

- :mod:`~prmkit.kinds.registry`: every kind declared once (:class:`~prmkit.kinds.registry.Kind`): its name, layout,
  head, whether it trains, its card and what training and loading branch on; nothing else spells a kind's name;
- :mod:`~prmkit.kinds.spec`: :class:`~prmkit.kinds.spec.KindSettings` and detection from a model's files;
- :mod:`~prmkit.kinds.encoder`: a kind's text layout, tokens and the positions read (``KindEncoder``), with
  :mod:`~prmkit.kinds.chat_template` and :mod:`~prmkit.kinds.chat_turns` for the chat kinds;
- :mod:`~prmkit.kinds.heads`: the torch side: the step loss, the Qwen-PRM head, the two-reward-token head;
- :mod:`~prmkit.kinds.cards`: what a model card says about a kind prmkit trains (the transformers snippets).

This layer knows nothing of loading models or of the engine: :mod:`prmkit.scoring.kinds` builds a scorer for a kind.
"""
