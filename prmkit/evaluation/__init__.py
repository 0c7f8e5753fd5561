"""`prmkit eval`: per-step metrics, ProcessBench first-error metrics and Best-of-N, as a report with plots.

- :mod:`~prmkit.evaluation.evaluate`: the subsets, scoring them, the threshold and one report per model;
- :mod:`~prmkit.evaluation.report`: the report's shape (a plain dict, with a JSON Schema) and its accessors;
- :mod:`~prmkit.evaluation.render`: the Markdown and terminal tables;
- :mod:`~prmkit.evaluation.plots`: the PNG plots;
- :mod:`~prmkit.evaluation.write`: the output directory's rules and writing the report set atomically.
"""
