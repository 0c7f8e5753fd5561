"""One config schema for every subcommand: defaults < YAML file < command-line flags.

- :mod:`~prmkit.config.schema`: the sections (dataclasses), their choices and ranges,
:class:`~prmkit.config.schema.Config`;
- :mod:`~prmkit.config.load`: reading YAML (bounded), ``--set`` dotted keys, type coercion, dumping a config back;
- :mod:`~prmkit.config.training_args`: the ``transformers.TrainingArguments`` fields the ``train`` section takes.
"""
