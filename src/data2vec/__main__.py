import sys

from data2vec.cli import main

sys.exit(main())
