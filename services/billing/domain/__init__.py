"""billing's pure rules: money, pricing, billing periods and invoice building
(no I/O, no logging, no clock reads; `now` is always passed in)."""
