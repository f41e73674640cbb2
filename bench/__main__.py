import sys

from .run import main

# Guarded: the engine worker processes (spawn) import the main module.
if __name__ == "__main__":
    sys.exit(main())
