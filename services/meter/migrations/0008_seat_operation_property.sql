-- Seat meters (AGGREGATION_SEATS_*): the metadata key of an event's operation
-- ("add" or "remove"); '' for every other meter.
ALTER TABLE meter.meters ADD COLUMN operation_property text NOT NULL DEFAULT '';
