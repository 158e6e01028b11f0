"""Kept for modules not yet moved to :mod:`tests.helpers`."""

from tests.helpers import wait_until

__all__ = ["wait_until"]
