"""Models and model directories.

- :mod:`~prmkit.models.model_dir`: ``prmkit.json``, what a trained model's directory records (tokenization, labels,
  kind), read back and checked;
- :mod:`~prmkit.models.loading`: the tokenizer, a base model for training, a trained model back (full or LoRA);
- :mod:`~prmkit.models.lora`: LoRA settings; :mod:`~prmkit.models.files`: checks of a directory's files before
  transformers trusts them; :mod:`~prmkit.models.memory`: the memory estimate and device budgets.
"""
