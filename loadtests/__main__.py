"""`python -m loadtests <scenario> [flags]`: see loadtests/cli.py and loadtests/README.md."""

from loadtests.cli import main

main()
