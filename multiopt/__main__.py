from .cli import entry

# Guarded: multiprocessing's forkserver re-imports the main module in its workers.
if __name__ == "__main__":
    entry()
