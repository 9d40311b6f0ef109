import sys

from edit_serve.cli import main

sys.exit(main())
