"""Step-labelled data: from a file, a directory or a Hub id to a tokenized, cached dataset.

- :mod:`~prmkit.data.formats`: the data formats registry (detection, conversion to stepwise rows, checks);
- :mod:`~prmkit.data.split_spec`: `datasets`' split syntax on local sources (``rows.jsonl[:300]``);
- :mod:`~prmkit.data.sources`: reading records from a source, naming and rejecting bad rows;
- :mod:`~prmkit.data.tokenized`: stepwise rows to a tokenized ``datasets.Dataset``, verified when read back;
- :mod:`~prmkit.data.prepared_input`: a `prmkit prepare` output given as input, checked against the run;
- :mod:`~prmkit.data.splits`: the splits of a run (held-out eval fraction, prepared inputs);
- :mod:`~prmkit.data.prepare`: the cache, :func:`~prmkit.data.prepare.prepare_splits`.
"""
