"""``python -m search.cli``: the same as the ``sparse-search`` console script."""

from search.cli.commands import main

main()
