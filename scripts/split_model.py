#!/usr/bin/env python3
"""Same as `cake-split-model`: python scripts/split_model.py --model-path DIR --topology T --output OUT"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cake.split import main  # noqa: E402

if __name__ == "__main__":
    main()
