"""Small data files the tests read, shipped with the repository (no path outside it).

``tinyshakespeare_head.txt``: the first 20 KB (whole lines, 19,996 bytes) of Karpathy's
tinyshakespeare (public domain text): the text-source, packing, sampling and training tests.
"""

import os

DATA_DIR = os.path.dirname(os.path.abspath(__file__))
# Absolute, and relative to the repository root (how configs name a data file).
SHAKESPEARE = os.path.join(DATA_DIR, "tinyshakespeare_head.txt")
SHAKESPEARE_REL = os.path.join("tests", "data", "tinyshakespeare_head.txt")
