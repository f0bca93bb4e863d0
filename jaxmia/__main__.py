import sys

from jaxmia.cli import main

sys.exit(main())
