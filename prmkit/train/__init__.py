"""`prmkit train`: fine-tune a PRM with ``transformers.Trainer`` on accelerate (one process or many).

- :mod:`~prmkit.train.recipe`: the recipe, read top to bottom (data, model, trainer; fit; save);
- :mod:`~prmkit.train.batching`: collation, length grouping and packing; :mod:`~prmkit.train.kernels`: attention
  and Liger kernels by name;
- :mod:`~prmkit.train.lm_tag`: what the lm-tag kind adds (its tag token, the loss on two tokens);
- :mod:`~prmkit.train.run_dir`: the output directory (resume, overwrite, the recorded config);
- :mod:`~prmkit.train.example`: the bundled offline example.
"""
