import sys

from .cli import main

# Guarded: multiprocessing's forkserver re-imports the main module in its workers.
if __name__ == "__main__":
    sys.exit(main())
