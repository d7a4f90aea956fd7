"""python -m dera_local.cli"""

from . import main

main()
