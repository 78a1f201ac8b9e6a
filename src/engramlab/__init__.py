"""engramlab: find, read, edit and protect the knowledge stored inside neural networks."""

from engramlab.errors import EngramError

__version__ = "0.1.0"
__all__ = ["EngramError", "__version__"]
