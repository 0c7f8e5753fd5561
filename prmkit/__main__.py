# `accelerate launch -m prmkit train ...` and `python -m prmkit` both enter here.
from prmkit.cli.app import main

if __name__ == "__main__":
    main()
