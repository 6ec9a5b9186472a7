"""A file cut in the middle of an edit."""

import json


def load(path):
    with open(path) as f:
        return json.load(f
