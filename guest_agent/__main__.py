"""``python3 -m guest_agent``: run the agent (see agent.py)."""

import sys

from guest_agent.agent import main

sys.exit(main())
