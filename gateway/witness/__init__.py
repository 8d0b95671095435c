"""A C2SP tlog-witness: a second party that cosigns a log's checkpoints only when they are consistent.

`state.py` keeps, per log, the latest checkpoint cosigned, and decides each submission atomically;
`app.py` is its HTTP face (`canarygate witness serve`). The log's side is `gateway.evidence.witnessing`.
"""

from .app import witness_app
from .state import WitnessState, init_witness, load_cosigner

__all__ = ["WitnessState", "init_witness", "load_cosigner", "witness_app"]
