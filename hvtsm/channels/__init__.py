"""Inter-zone channels: zones send each other messages only through the host's broker
(`broker.py`), which checks the group's grants (`grants.py`), reassembles what arrives in
pieces within bounds (`reassembly.py`) and audits every message and refusal (`audit.py`)."""
