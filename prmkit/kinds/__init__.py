"""PRM kinds: how each published kind of process reward model reads a step's score.

- :mod:`~prmkit.kinds.spec`: the names, :class:`~prmkit.kinds.spec.KindSettings` and detection from a model's files;
- :mod:`~prmkit.kinds.encoder`: a kind's text layout, tokens and the positions read (``KindEncoder``), with
  :mod:`~prmkit.kinds.chat_template` and :mod:`~prmkit.kinds.chat_turns` for the chat kinds;
- :mod:`~prmkit.kinds.heads`: the torch side: the step loss, the Qwen-PRM head, the two-reward-token head.

This layer knows nothing of loading models or of the engine: :mod:`prmkit.scoring.kinds` builds a scorer for a kind.
"""
