"""python -m oauthmig."""

from oauthmig.cli import main

main()
