"""Pure meter rules: metadata values, filters, aggregation, time windows, usage queries,
and a reference aggregator that the SQL rollups must agree with.

No I/O, no logging, no clock reads; nothing here mutates its inputs. Numbers are
`decimal.Decimal`, never float.
"""
