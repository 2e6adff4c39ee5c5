"""``python -m leuko.cli`` is the same as the ``leuko`` command."""

from leuko.cli import main

main()
