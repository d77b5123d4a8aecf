"""`python -m kvgate_sim --port 8000 --replicas 8 --profile cpu-scaled --model-name llama`."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
