"""``python -m search.cli``: the same as the ``sparse-search`` console script."""

from search.cli.app import main

main()
