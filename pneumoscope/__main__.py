"""`python -m pneumoscope ...` (and `torchrun -m pneumoscope train ...`)."""
from pneumoscope.cli import run

if __name__ == "__main__":
    run()
