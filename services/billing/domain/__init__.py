"""billing's pure rules: money, pricing, billing periods, invoice building and
field checks (no I/O, no logging, no clock reads; `now` is always passed in)."""
