"""`prmkit train`: fine-tune a PRM with ``transformers.Trainer`` on accelerate (one process or many).

- :mod:`~prmkit.training.recipe`: the recipe, read top to bottom (data, model, trainer; fit; save);
- :mod:`~prmkit.training.trainer`: the Trainer subclass and its callbacks (imports transformers; the recipe imports it
  lazily); :mod:`~prmkit.training.save`: the final model directory; :mod:`~prmkit.training.result`: what a run did;
- :mod:`~prmkit.training.batching`: collation, length grouping and packing; :mod:`~prmkit.training.kernels`: attention
  and Liger kernels by name;
- :mod:`~prmkit.training.lm_tag`: what the lm-tag kind adds (its tag token, the loss on two tokens);
- :mod:`~prmkit.training.run_dir`: the output directory (resume, overwrite, the recorded config);
- :mod:`~prmkit.training.example`: the bundled offline example.
"""
