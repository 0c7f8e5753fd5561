"""Low-level helpers every layer may use: JSON in and out, atomic writes, secret redaction, output guards,
file locations, worker processes, checkpoint markers. Nothing here imports torch or another prmkit layer."""
