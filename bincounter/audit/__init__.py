"""The inventory audit: which bins' photos disagree with the warehouse system's expected quantity.

``core`` scores chunks and merges them, ``metrics`` measures detection quality when the truth
is known, ``report`` writes ``audit.md`` / ``audit.html``, ``cli`` is ``bincounter audit``.
"""
