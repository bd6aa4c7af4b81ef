"""`python -m diffscore.app.cli`: the `diffscore` command."""

from diffscore.app.cli import main

main()
