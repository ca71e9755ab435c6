"""Run an unmodified Hugging Face training script with this package's names registered.

transformers' example scripts (``run_clm.py`` ...) and any script built on ``HfArgumentParser``
+ ``TrainingArguments`` reject ``--optim apollo_mini`` unless something imports
``lightning_memopt`` first. This launcher does that, then runs the script as ``__main__`` with
its arguments unchanged (``sys.argv[0]`` is the script, ``sys.path[0]`` its folder, as with
``python SCRIPT.py``)::

    python -m lightning_memopt.hf run_clm.py --model_name_or_path ./my-llama \\
        --train_file corpus.txt --do_train --optim apollo_mini --output_dir out
    torchrun --nproc_per_node 2 -m lightning_memopt.hf run_clm.py ...   # one process per device
    python -m lightning_memopt.hf -m some.module [ARGS...]              # a module instead of a file

Example:
    >>> from lightning_memopt.hf.__main__ import main
    >>> # main(["train.py", "--optim", "apollo_mini", "--output_dir", "out"])
"""

from __future__ import annotations

import os
import runpy
import sys
from collections.abc import Sequence

from .registration import register_on_transformers_import

USAGE = (
    "usage: python -m lightning_memopt.hf SCRIPT.py [ARGS...]\n"
    "       python -m lightning_memopt.hf -m MODULE [ARGS...]\n"
    "Registers lightning_memopt's names (TrainingArguments(optim='apollo', 'apollo_mini', ...)) and runs the "
    "Hugging Face training script as __main__ with its arguments unchanged (works under torchrun -m)."
)


def main(argv: Sequence[str] | None = None) -> None:
    """Register our names, then run ``argv[0]`` (a script path, or ``-m MODULE``) as ``__main__``
    with ``argv[1:]`` as its arguments.

    Raises:
        SystemExit: with the usage for no arguments or ``--help``; with a message naming the
            path when the script does not exist.

    Example:
        >>> main(["--help"])  # doctest: +SKIP
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        raise SystemExit(0 if argv else 2)

    # `python -m lightning_memopt.hf` has imported the package (which registers everything);
    # this makes main() called from Python register the HF names too, without importing the
    # Lightning adapters from the HF one.
    register_on_transformers_import()

    if argv[0] == "-m":
        if len(argv) < 2:
            raise SystemExit(f"lightning_memopt.hf: -m needs a module name.\n{USAGE}")
        module, arguments = argv[1], argv[2:]
        sys.argv = [module, *arguments]
        runpy.run_module(module, run_name="__main__", alter_sys=True)
        return
    script, arguments = argv[0], argv[1:]
    if not os.path.isfile(script):
        raise SystemExit(
            f"lightning_memopt.hf: no script at {script!r} (cwd {os.getcwd()!r}); pass the path of a Python file "
            "(or -m MODULE).\n" + USAGE
        )
    sys.argv = [script, *arguments]
    # As `python SCRIPT.py`: the script's folder first on the path (its sibling imports work).
    sys.path[0] = os.path.dirname(os.path.abspath(script))
    runpy.run_path(script, run_name="__main__")


if __name__ == "__main__":
    main()
