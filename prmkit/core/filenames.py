"""The names of the files prmkit writes into its own directories, declared once."""

from __future__ import annotations

PRMKIT_JSON = "prmkit.json"


CONFIG_YAML = "prmkit_config.yaml"


METADATA_FILE = "prmkit_dataset.json"


REJECTS_FILE = "rejects.jsonl"


REJECTS_FILE = "rejects.jsonl"
