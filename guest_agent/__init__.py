"""hvtsm guest agent: stdlib only, python >= 3.9. `protocol` is the wire protocol the host
imports; `agent` is the program (``python3 -m guest_agent``)."""

__version__ = "0.1.0"
