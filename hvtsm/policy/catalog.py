"""Where policies are found: the installation's policy directory, and references from one
policy to another ([[segment]] policy, [transient] policy) by name or by path."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from hvtsm.errors import PolicyError
from hvtsm.policy.loader import load_policy
from hvtsm.policy.model import Policy

DEFAULT_POLICY = "default"


def policy_dir() -> Path:
    """policies/ beside the package (source checkout) or under sys.prefix (installed)."""
    here = Path(__file__).resolve().parents[2]
    for base in (here, Path(sys.prefix) / "share" / "hvtsm"):
        if (base / "policies").is_dir():
            return base / "policies"
    return Path("policies")


def default_policy_path() -> str:
    return str(policy_dir() / f"{DEFAULT_POLICY}.toml")


def resolve(ref: str, *, beside: str | None = None) -> Path:
    """A bare name (no '/', no '.toml') is policies/NAME.toml of the installation; anything
    else is a path, relative to the referring policy's directory when there is one."""
    if "/" not in ref and not ref.endswith(".toml"):
        return policy_dir() / f"{ref}.toml"
    path = Path(ref)
    if not path.is_absolute() and beside is not None:
        path = Path(os.path.dirname(os.path.abspath(beside))) / path
    return path


def load_referenced(ref: str, *, beside: str | None, field: str) -> Policy:
    """Load a policy another one names; a missing or bad one is a PolicyError naming the
    referring file and field as well."""
    path = resolve(ref, beside=beside)
    if not path.exists():
        raise PolicyError(f"names policy {ref!r}, which is not at {path}", file=beside,
                          field=field, hint="a name means policies/NAME.toml; or give a path")
    try:
        return load_policy(path)
    except PolicyError as exc:
        raise PolicyError(f"the policy it names is not valid: {exc}", file=beside,
                          field=field) from None
