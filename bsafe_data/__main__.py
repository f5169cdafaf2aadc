"""`python -m bsafe_data` runs the CLI."""

from bsafe_data.cli import main

main()
