-- Contract v2, section 5 (trace context): the W3C `traceparent` / `tracestate` of the command
-- that wrote an outbox or courier row, kept with the row so that the relay publishes them as
-- the message's headers however late it runs (after a restart, by another worker).
--
-- Nullable columns without a default: adding them rewrites nothing, and rows written before
-- (or by a worker of the previous version during a rolling upgrade) simply carry no trace.
-- Not personal data: random identifiers chosen by the caller's tracer, validated at the edge.
ALTER TABLE outbox ADD COLUMN traceparent text, ADD COLUMN tracestate text;
ALTER TABLE courier_outbox ADD COLUMN traceparent text, ADD COLUMN tracestate text;
