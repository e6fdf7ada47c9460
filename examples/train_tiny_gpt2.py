"""Train a tiny GPT-2 on bundled Shakespeare with MNNCallback and watch its representations compress.

The same as ``mnn-callback demo`` (see ``--help`` for the flags that scale it up: ``--n-layer``,
``--n-embd``, ``--steps``, ``--device cuda``, ``--bf16``, ``--wandb``, ``--out``). Defaults finish
in well under 5 minutes on 2 CPU cores; the code is in :mod:`mnn_callback.demo`.
"""

import sys

from mnn_callback.demo import main

if __name__ == "__main__":
    sys.exit(main())
