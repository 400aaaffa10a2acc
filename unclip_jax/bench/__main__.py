"""``python -m unclip_jax.bench``: see :mod:`unclip_jax.bench`."""

import sys

from unclip_jax.bench.runner import main

if __name__ == "__main__":
    sys.exit(main())
