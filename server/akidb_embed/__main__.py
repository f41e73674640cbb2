import sys

from .cli.main import main

# Guarded: worker processes (spawn) import the main module.
if __name__ == "__main__":
    sys.exit(main())
