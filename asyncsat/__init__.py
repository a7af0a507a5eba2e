"""asyncsat: an asyncio daemon that downloads satellite data and never loses track of it."""

from __future__ import annotations

__version__ = "0.1.0"
